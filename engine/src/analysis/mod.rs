//! Analysis on top of the forward pass: the logit lens ([`lens`]), attention heads ([`heads`]:
//! entropy, importance, the pruning search, physical pruning) and a classifier's heads
//! ([`classifier_heads`]: gradient importance, the masking search). Activations and attention maps by name
//! come from [`crate::model::Model::inspect`].
//!
//! Owns: analyses that run whole prompts or datasets. Imports: `model`, `exits`, `math`, `io`, and for
//! head-mask gradients `encoder` and `training`.

pub mod classifier_heads;
pub mod heads;
pub mod lens;
