//! Analysis on top of the forward pass: the logit lens ([`lens`]) and attention heads ([`heads`]:
//! entropy, importance, the pruning search, physical pruning). Activations and attention maps by name
//! come from [`crate::model::Model::inspect`].
//!
//! Owns: analyses that run whole prompts. Imports: `model`, `exits`, `math`, `io`.

pub mod heads;
pub mod lens;
