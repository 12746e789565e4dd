//! Computing with f16 or bf16 weight matrices (`--dtype`, `Cpu::with_weight_dtype`) stays within the
//! rounding those dtypes imply of the f32 reference that transformers recorded.

use layerwise::{load_on, Cpu, DType, ForwardRequest};
use layerwise_tests::{expected, expected_ids, fixture_str, relative_error};

#[test]
fn narrow_weights_stay_close_to_the_f32_reference() {
    let name = "gpt2-sharded";
    let recorded = expected(name);
    let ids = expected_ids(&recorded);
    // bf16 keeps 8 bits of mantissa, f16 11: errors of a few parts in a thousand, resp. ten thousand,
    // grow through four layers.
    for (dtype, tolerance) in [(DType::F16, 5e-3), (DType::BF16, 3e-2), (DType::F32, 1e-4)] {
        let loaded = load_on(&fixture_str(name), Cpu::with_weight_dtype(dtype)).expect("load");
        let out = loaded.model.forward(&ids, &ForwardRequest::everything(loaded.model.spec())).expect("forward");
        let logits = out.logits.expect("logits");
        let logits_err = relative_error(&logits, &recorded["logits"].values);
        assert!(logits_err <= tolerance, "{dtype}: relative error {logits_err:.2e} above {tolerance:e}");
        for (layer, values) in &out.exits {
            let err = relative_error(values, &recorded[&format!("exit.{layer}")].values);
            assert!(err <= tolerance, "{dtype} exit {layer}: relative error {err:.2e}");
        }
        if dtype != DType::F32 {
            assert!(logits_err > 1e-5, "{dtype} really computed with narrower weights ({logits_err:e})");
        }
    }
}
