//! A pytorch_model.bin is converted to safetensors once, and the conversion holds exactly the
//! archive's tensors.

use layerwise::io::torch_pickle::{converted_safetensors, read_state_dict};
use layerwise::Weights;
use layerwise_tests::fixture;

#[test]
fn conversion_is_cached_and_faithful() {
    let bin = fixture("gpt-neo-bin").join("pytorch_model.bin");
    let first = converted_safetensors(&bin).expect("convert");
    let stamp = std::fs::metadata(&first).expect("meta").modified().expect("mtime");
    let second = converted_safetensors(&bin).expect("convert again");
    assert_eq!(first, second);
    assert_eq!(std::fs::metadata(&second).expect("meta").modified().expect("mtime"), stamp, "not rewritten");

    let archive = read_state_dict(&bin).expect("read archive");
    let weights = Weights::open(&[first]).expect("open converted");
    assert!(archive.tensors.len() > 50);
    for (name, tensor) in &archive.tensors {
        let converted = weights.get(name).expect("tensor present");
        assert_eq!(converted.shape(), tensor.shape.as_slice(), "{name}");
        assert_eq!(converted.bytes(), tensor.data.as_slice(), "{name}");
    }
    // GPT-Neo ties lm_head to wte; torch.save stores both names over one storage.
    assert_eq!(
        weights.get("lm_head.weight").expect("lm_head").bytes(),
        weights.get("transformer.wte.weight").expect("wte").bytes()
    );
}
