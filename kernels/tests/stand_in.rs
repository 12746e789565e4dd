//! The whole CUDA backend, end to end, on the stand-in driver (kernels/standin: the CUDA driver API
//! over host memory, each launch run by the CPU build of the same kernel): the op conformance suite,
//! and generation equal to the CPU's on the fixtures for every plan and strategy. Each test re-runs
//! itself in a child process with the stand-in on LD_LIBRARY_PATH (the loader reads that variable
//! only at start). The stand-in runs launches synchronously, so races between streams cannot show.
//! Also the fallbacks: no driver (this machine, outside the child), and a driver with no device.
//!
//! On a machine with a GPU, `tools/gpu-selftest` runs the conformance, generation and launch tests
//! with LAYERWISE_STANDIN_CHILD=1 and without the stand-in on the path: the same checks on the real
//! driver and device.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use layerwise::backend::{conformance, Backend};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::generation::{
    generate, BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, GenerationOptions, SampleOptions,
    SamplingOptions, Strategy,
};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load_on, Cpu};
use layerwise_kernels::cuda::{device_count, Cuda};
use layerwise_tests::fixture_str;

fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Runs `test` again in a child with the stand-in driver on the library path (and `env`); returns
/// true in the child, where the test's body runs.
fn in_child(test: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var_os("LAYERWISE_STANDIN_CHILD").is_some() {
        return true;
    }
    let dir = env!("LAYERWISE_STANDIN_DIR");
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{dir}:{old}"),
        _ => dir.to_string(),
    };
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    command.env("LD_LIBRARY_PATH", path).env("LAYERWISE_STANDIN_CHILD", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("run the child");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    say(&stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "{test} in the child:\n{stdout}\n{stderr}");
    false
}

/// The backend on the stand-in, or None (with the reason said) when NVRTC is missing to build the
/// kernels' module.
fn stand_in_backend() -> Option<Cuda> {
    if !layerwise_kernels::cuda::program::nvrtc_available() {
        say("stand_in_driver_*: SKIPPED: libnvrtc not found (it compiles the module the stand-in loads; .ci/run installs it)");
        return None;
    }
    Some(Cuda::open(0, None).expect("the CUDA backend on the stand-in driver"))
}

#[test]
fn stand_in_driver_runs_the_conformance_suite() {
    // Every launch must come as a programmatic dependent one (the stand-in refuses a plain launch).
    if !in_child("stand_in_driver_runs_the_conformance_suite", &[("LAYERWISE_STANDIN_EXPECT_DEPENDENT", "1")]) {
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    say(&format!(
        "stand_in_driver: conformance on {} (dependent launch: {})",
        cuda.description(),
        cuda.dependent_launch()
    ));
    assert!(cuda.dependent_launch(), "sm_90: kernels launch as programmatic dependents");
    type Check = fn(&Cuda) -> layerwise::Result<()>;
    let checks: [(&str, Check); 14] = [
        ("embed", conformance::embed),
        ("elementwise", conformance::elementwise),
        ("norms", conformance::norms),
        ("linear", conformance::linear),
        ("linear_epilogues", conformance::linear_epilogues),
        ("norm_linear", conformance::norm_linear),
        ("activations", conformance::activations),
        ("rope", conformance::rope),
        ("scale_heads", conformance::scale_heads),
        ("rows_and_columns", conformance::rows_and_columns),
        ("paged_attention", conformance::paged_attention),
        ("attention_probs", conformance::attention_probs),
        ("contrast_acd", conformance::contrast_acd),
        ("argmax_rows", conformance::argmax_rows),
    ];
    // Twice: with graphs off, every new buffer is fresh memory, which the stand-in fills with NaN
    // (a value an op leaves unwritten fails); then with launches held back in chunks of 4 (the
    // smallest graph), copies and reads in between having to submit them first.
    let cuda = cuda.with_graphs(None).expect("graphs off");
    for (name, check) in checks {
        if let Err(e) = check(&cuda) {
            panic!("conformance {name} on the CUDA backend, graphs off: {e}");
        }
    }
    let cuda = cuda.with_graphs(Some(4)).expect("graphs on");
    for (name, check) in checks {
        if let Err(e) = check(&cuda) {
            panic!("conformance {name} on the CUDA backend, graphs on: {e}");
        }
    }
    say(&format!("stand_in_driver: conformance with graphs of 4 launches: {:?}", cuda.graph_stats()));
}

/// Plans over exits `low` and `top` of the fixture.
fn plans(low: usize, top: usize) -> Vec<(&'static str, PlanOptions)> {
    let contrast = |upper, lower, projection| PlanOptions {
        plan: ExitPlan::Contrast { upper, lower },
        projection,
        ..Default::default()
    };
    vec![
        ("original", PlanOptions::default()),
        ("exit low", PlanOptions { plan: ExitPlan::Exit(low), ..Default::default() }),
        ("acd top vs low", contrast(Upper::Layer(top), low, Projection::ExitHeads)),
        ("acd original vs low, lens", contrast(Upper::Original, low, Projection::Lens)),
        (
            "custom contrast",
            PlanOptions {
                contrast: Contrast::Custom(Arc::new(|u: &[f32], l: &[f32], out: &mut [f32]| {
                    for ((o, u), l) in out.iter_mut().zip(u).zip(l) {
                        *o = u - 0.5 * l;
                    }
                })),
                ..contrast(Upper::Layer(top), low, Projection::ExitHeads)
            },
        ),
    ]
}

/// Every strategy; DoLa's premature layers lie below `low`, so that every plan runs them.
fn strategies(low: usize) -> Vec<(&'static str, Strategy)> {
    vec![
        ("greedy", Strategy::Greedy),
        (
            "sample",
            Strategy::Sample(SampleOptions {
                sampling: SamplingOptions { seed: 7, ..Default::default() },
                num_return_sequences: 2,
            }),
        ),
        ("beam 3", Strategy::Beam(BeamOptions { num_beams: 3, num_return_sequences: 2, ..Default::default() })),
        ("contrastive", Strategy::Contrastive(ContrastiveOptions { penalty_alpha: 0.6, top_k: 4 })),
        (
            "dola",
            Strategy::Dola(DolaOptions {
                layers: DolaLayers::List((0..low).collect()),
                sampling: None,
                num_return_sequences: 1,
            }),
        ),
    ]
}

fn generated<B: Backend>(
    model: &layerwise::Model<B>,
    plan: &PlanOptions,
    strategy: &Strategy,
    prompt: &[u32],
) -> Vec<Vec<u32>> {
    generated_with(model, plan, strategy, prompt, 4, 4)
}

fn generated_with<B: Backend>(
    model: &layerwise::Model<B>,
    plan: &PlanOptions,
    strategy: &Strategy,
    prompt: &[u32],
    new_tokens: usize,
    block_size: usize,
) -> Vec<Vec<u32>> {
    let options = GenerationOptions { max_new_tokens: new_tokens, strategy: strategy.clone(), ..Default::default() };
    let decoder_options = DecoderOptions {
        plan: plan.clone(),
        block_size,
        cache_tokens: Some(options.cache_tokens(prompt.len())),
        head_mask: None,
    };
    let mut decoder = Decoder::new(model, decoder_options).expect("decoder");
    generate(&mut decoder, prompt, &options, None, |_| true).expect("generate").sequences
}

/// Every plan and strategy on `fixture`, on the CPU and on the CUDA backend over the stand-in.
fn generates_what_the_cpu_generates(test: &str, fixture: &str) {
    if !in_child(test, &[]) {
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    let prompt = [5u32, 17, 42, 3, 8];
    let cpu = load_on(&fixture_str(fixture), Cpu::default()).expect("load on the CPU");
    let gpu = load_on(&fixture_str(fixture), cuda).expect("load on CUDA");
    let spec = cpu.model.spec();
    let (low, top) = (spec.exit_layers[0], spec.num_layers);
    let mut runs = 0;
    for (plan_name, plan) in plans(low, top) {
        for (strategy_name, strategy) in strategies(low) {
            let want = generated(&cpu.model, &plan, &strategy, &prompt);
            let got = generated(&gpu.model, &plan, &strategy, &prompt);
            assert_eq!(got, want, "{fixture} / {plan_name} / {strategy_name}");
            runs += 1;
        }
    }
    assert_eq!(runs, 25);
}

#[test]
fn stand_in_driver_generates_what_the_cpu_generates_gpt2() {
    generates_what_the_cpu_generates("stand_in_driver_generates_what_the_cpu_generates_gpt2", "gpt2-sharded");
}

#[test]
fn stand_in_driver_generates_what_the_cpu_generates_gpt_neo_local_attention() {
    generates_what_the_cpu_generates(
        "stand_in_driver_generates_what_the_cpu_generates_gpt_neo_local_attention",
        "gpt-neo-bin",
    );
}

#[test]
fn stand_in_driver_generates_what_the_cpu_generates_llama_bf16_gqa_rope() {
    generates_what_the_cpu_generates(
        "stand_in_driver_generates_what_the_cpu_generates_llama_bf16_gqa_rope",
        "llama-bf16",
    );
}

#[test]
fn stand_in_driver_counts_launches_per_decode_step() {
    if !in_child("stand_in_driver_counts_launches_per_decode_step", &[]) {
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    let loaded = load_on(&fixture_str("gpt2-sharded"), cuda).expect("load on CUDA");
    let layers = loaded.model.spec().num_layers as u64;
    for (name, plan) in plans(1, loaded.model.spec().num_layers) {
        let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan, ..Default::default() }).expect("decoder");
        let seq = decoder.add_sequence(&[5, 17, 42]).expect("prompt");
        let first = decoder.run_step().expect("prefill").argmax().expect("argmax")[0];
        decoder.append(seq, first).expect("append");
        let before = loaded.model.backend().launches();
        let next = decoder.run_step().expect("decode").argmax().expect("argmax")[0];
        let per_step = loaded.model.backend().launches() - before;
        say(&format!(
            "stand_in_driver: {name}: {per_step} kernel launches per decode step ({layers} layers), next token {next}"
        ));
        // Per block: 4 products (each norm done by the product that reads it, the activation and the
        // two residual adds as they store) and the attention (which reads q|k|v in place and, in a
        // decoding step, writes the cache itself) = 5; plus embeddings, the heads (each fused with
        // the final norm) and the contrast.
        assert!(per_step <= 5 * layers + 12, "{name}: {per_step} launches");
    }
}

#[test]
fn stand_in_driver_launches_plainly_when_asked() {
    // Every launch must come as a plain one (the stand-in refuses a programmatic dependent launch).
    if !in_child("stand_in_driver_launches_plainly_when_asked", &[("LAYERWISE_STANDIN_EXPECT_DEPENDENT", "0")]) {
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    let cuda = cuda.with_dependent_launch(false).expect("plain launches");
    assert!(!cuda.dependent_launch());
    // Decoding with plain launches: every kernel of a step, the products' early loads and the
    // attention's and ACD's tickets included (the conformance suite runs with dependent launches).
    greedy_and_acd_match_the_cpu(cuda);
}

#[test]
fn stand_in_driver_before_sm_90_launches_plainly() {
    let env = [("LAYERWISE_STANDIN_SM", "80"), ("LAYERWISE_STANDIN_EXPECT_DEPENDENT", "0")];
    if !in_child("stand_in_driver_before_sm_90_launches_plainly", &env) {
        return;
    }
    if std::env::var_os("LAYERWISE_STANDIN_SM").is_none() {
        say("stand_in_driver_before_sm_90_launches_plainly: on a real device (no stand-in to report sm_80): not checked");
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    assert!(cuda.description().contains("sm_80"), "{}", cuda.description());
    assert!(!cuda.dependent_launch());
    let err = cuda.with_dependent_launch(true).err().expect("no dependent launch before sm_90").to_string();
    assert!(err.contains("sm_90"), "{err}");
    greedy_and_acd_match_the_cpu(stand_in_backend().expect("the backend"));
}

/// Greedy decoding of the GPT-2 fixture with the original head and with ACD on `cuda` equals the CPU's.
fn greedy_and_acd_match_the_cpu(cuda: Cuda) {
    let prompt = [5u32, 17, 42, 3, 8];
    let cpu = load_on(&fixture_str("gpt2-sharded"), Cpu::default()).expect("load on the CPU");
    let gpu = load_on(&fixture_str("gpt2-sharded"), cuda).expect("load on CUDA");
    let spec = cpu.model.spec();
    for (plan_name, plan) in plans(spec.exit_layers[0], spec.num_layers) {
        if plan_name == "original" || plan_name == "acd top vs low" {
            let want = generated(&cpu.model, &plan, &Strategy::Greedy, &prompt);
            assert_eq!(generated(&gpu.model, &plan, &Strategy::Greedy, &prompt), want, "{plan_name}");
        }
    }
}

#[test]
fn stand_in_driver_replays_decode_steps_from_graphs() {
    if !in_child("stand_in_driver_replays_decode_steps_from_graphs", &[]) {
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    // Chunks of 8 launches: a 4-block GPT-2 step (26 launches) makes several graphs.
    let (tokens, stats) = decode_with_graphs(cuda.with_graphs(Some(8)).expect("graphs on"));
    say(&format!("stand_in_driver: graphs of 8 launches: {stats:?}"));
    assert!(stats.captured > 0 && stats.replays > stats.captured, "{stats:?}");
    // Off: the same tokens, no graph.
    let (plain, off) =
        decode_with_graphs(stand_in_backend().expect("the backend").with_graphs(None).expect("graphs off"));
    assert_eq!(off, layerwise_kernels::cuda::GraphStats::default());
    assert_eq!(tokens, plain, "graphs on and off");
}

#[test]
fn stand_in_driver_without_graph_capture_launches_one_by_one() {
    // The stand-in refuses every stream capture, as a driver without graph support would.
    if !in_child("stand_in_driver_without_graph_capture_launches_one_by_one", &[("LAYERWISE_STANDIN_NO_CAPTURE", "1")])
    {
        return;
    }
    if std::env::var_os("LAYERWISE_STANDIN_NO_CAPTURE").is_none() {
        say("stand_in_driver_without_graph_capture_launches_one_by_one: on a real device (no stand-in to refuse capture): not checked");
        return;
    }
    let Some(cuda) = stand_in_backend() else { return };
    let (_, stats) = decode_with_graphs(cuda.with_graphs(Some(8)).expect("graphs on"));
    assert_eq!(stats.captured, 0, "{stats:?}");
}

/// 40 greedy tokens of the GPT-2 fixture, with the original head and with ACD, on `cuda` (equal to
/// the CPU's), and the graphs it captured and launched on the way.
fn decode_with_graphs(cuda: Cuda) -> (Vec<Vec<Vec<u32>>>, layerwise_kernels::cuda::GraphStats) {
    let prompt = [5u32, 17, 42, 3, 8];
    let cpu = load_on(&fixture_str("gpt2-sharded"), Cpu::default()).expect("load on the CPU");
    let gpu = load_on(&fixture_str("gpt2-sharded"), cuda).expect("load on CUDA");
    let spec = cpu.model.spec();
    let mut all = Vec::new();
    for (plan_name, plan) in plans(spec.exit_layers[0], spec.num_layers) {
        if plan_name == "original" || plan_name == "acd top vs low" {
            let want = generated_with(&cpu.model, &plan, &Strategy::Greedy, &prompt, 40, 16);
            let got = generated_with(&gpu.model, &plan, &Strategy::Greedy, &prompt, 40, 16);
            assert_eq!(got, want, "{plan_name}");
            all.push(got);
        }
    }
    (all, gpu.model.backend().graph_stats())
}

#[test]
fn stand_in_driver_with_no_device_is_a_clear_error() {
    if !in_child("stand_in_driver_with_no_device_is_a_clear_error", &[("LAYERWISE_STANDIN_DEVICES", "0")]) {
        return;
    }
    assert_eq!(device_count(), 0);
    let err = Cuda::open(0, None).err().expect("no device").to_string();
    assert!(err.contains("no CUDA") && err.contains("device"), "{err}");
}

#[test]
fn no_driver_is_a_clear_error() {
    // This process has no stand-in on its path; on a machine with a real driver this test checks
    // the other side: the backend opens or says why not.
    match std::env::var_os("LAYERWISE_STANDIN_CHILD") {
        Some(_) => {}
        None if device_count() == 0 => {
            let err = Cuda::open(0, None).err().expect("no driver").to_string();
            assert!(err.contains("no CUDA driver"), "{err}");
        }
        None => say("a CUDA driver is present here: the no-driver case is not checked"),
    }
}

/// The decode matvec on a real device, for each product shape of gpt2-medium (and its LM head) and
/// each split (warps per output), f32 and bf16: each result checked against the CPU, then launched a
/// few times for Nsight Compute to time (`tools/gpu-selftest` runs it under `ncu`; the kernel table
/// tells the splits apart by grid size). Not a stand-in test: the emulation would take minutes.
#[test]
#[ignore = "a real GPU only: tools/gpu-selftest runs it (under Nsight Compute)"]
fn device_matvec_split_sweep() {
    use layerwise::backend::Layout;
    use layerwise::{DType, HostTensor};
    if device_count() == 0 {
        say("device_matvec_split_sweep: SKIPPED: no CUDA device");
        return;
    }
    let cpu = Cpu::default();
    let values = |n: usize, seed: u64| -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    // (in, out): attention q|k|v, attention output, MLP up, MLP down, LM head.
    for (n_in, n_out) in [(1024usize, 3072usize), (1024, 1024), (1024, 4096), (4096, 1024), (1024, 50257)] {
        for dtype in [DType::F32, DType::BF16] {
            let tensor = HostTensor::from_f32(values(n_in * n_out, 1), vec![n_out, n_in]).converted(dtype);
            let reference = cpu.weight(&tensor, Layout::OutIn).expect("cpu weight");
            let x = values(n_in, 2);
            let want = cpu
                .linear(&layerwise::backend::Matrix::new(x.clone(), 1, n_in).expect("x"), &reference, None)
                .expect("cpu linear");
            for split in [1usize, 2, 4, 8] {
                let cuda = Cuda::open(0, None).and_then(|c| c.with_matvec_split(Some(split))).expect("device");
                let weight = cuda.weight(&tensor, Layout::OutIn).expect("upload");
                let xd = cuda.upload(x.clone(), 1, n_in).expect("upload x");
                let got = cuda.to_host(&cuda.linear(&xd, &weight, None).expect("linear")).expect("download");
                let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let worst = got.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-4 * scale, "{dtype} {n_in}->{n_out} split {split}: off by {worst}");
                for _ in 0..3 {
                    cuda.linear(&xd, &weight, None).expect("linear");
                }
                cuda.to_host(&xd).expect("sync");
                say(&format!(
                    "device_matvec_split_sweep: {dtype} {n_in}->{n_out} split {split}: ok (off by {worst:.1e})"
                ));
            }
        }
    }
}
