//! `layerwise._native`: the engine as a Python extension module. It exposes a few primitives over
//! the Rust API (load, tokenize, forward, batched generation through the scheduler, the step-by-step
//! decoder); the transformers-like surface (`Model.from_pretrained`, `MultiExitConfiguration`,
//! `generate(**kwargs)`) is the pure-Python package around it (`python/layerwise/`).
//!
//! The GIL is released while the engine computes; a long generation checks for signals (Ctrl-C)
//! between steps. Engine errors become `layerwise.LayerwiseError` with the engine's message.
//!
//! A model runs on the CPU backend or on the CUDA one (`device="cuda[:N]"`, `"auto"`): [`Engine`]
//! holds either, and [`with_engine!`] runs the same generic code on whichever it is.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use layerwise::analysis::lens::{logit_lens, LensDecoder, LensOptions};
use layerwise::backend::{Backend, WeightFormat};
use layerwise::evaluation::heads::Heads;
use layerwise::evaluation::{rolling_windows, score_window, ContinuationScore, Window};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::generation::{Event, GenerationConfig, Request, Scheduler, SchedulerOptions};
use layerwise::io::tokenizer::Tokenizer;
use layerwise::runtime::{Decoder as EngineDecoder, DecoderOptions, SeqId};

use layerwise::{Cpu, ForwardRequest, InspectRequest, LoadedModel, ModelSpec};
use layerwise_kernels::cuda::{device_count, Cuda};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(_native, LayerwiseError, PyException, "An error of the layerwise engine.");

fn engine_error(e: layerwise::Error) -> PyErr {
    LayerwiseError::new_err(e.to_string())
}

/// A loaded checkpoint on the backend the caller chose.
#[derive(Clone)]
enum Engine {
    Cpu(Arc<LoadedModel<Cpu>>),
    Cuda(Arc<LoadedModel<Cuda>>),
}

/// Evaluates `$body` with `$loaded` bound to the engine's `&Arc<LoadedModel<B>>`, whichever `B` it is.
macro_rules! with_engine {
    ($engine:expr, $loaded:ident => $body:expr) => {
        match $engine {
            Engine::Cpu($loaded) => $body,
            Engine::Cuda($loaded) => $body,
        }
    };
}

impl Engine {
    /// Opens `source` on `device`: cpu, cuda, cuda:N, or auto (CUDA device 0 when a driver reports
    /// one, else the CPU).
    fn open(source: &str, device: &str, weights: Option<WeightFormat>, adapter: Option<&PathBuf>) -> PyResult<Engine> {
        fn load<B: Backend>(source: &str, backend: B, adapter: Option<&PathBuf>) -> PyResult<Arc<LoadedModel<B>>> {
            let loaded = match adapter {
                None => layerwise::load_on(source, backend),
                Some(dir) => layerwise::load_adapted(source, dir, backend),
            };
            loaded.map(Arc::new).map_err(engine_error)
        }
        let ordinal = match device {
            "cpu" => None,
            "auto" => (device_count() > 0).then_some(0),
            "cuda" => Some(0),
            other => Some(other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).ok_or_else(|| {
                LayerwiseError::new_err(format!("device `{other}` is not one of cpu, cuda, cuda:N, auto"))
            })?),
        };
        match ordinal {
            None => Ok(Engine::Cpu(load(source, Cpu { weights }, adapter)?)),
            Some(n) => {
                if weights == Some(WeightFormat::Q8) {
                    return Err(LayerwiseError::new_err(
                        "dtype q8: 8-bit weights run on the CPU only (device=\"cpu\")",
                    ));
                }
                let backend = Cuda::open(n, weights.and_then(WeightFormat::dtype))
                    .map_err(|e| LayerwiseError::new_err(format!("device `{device}`: {e}")))?;
                Ok(Engine::Cuda(load(source, backend, adapter)?))
            }
        }
    }

    fn spec(&self) -> &ModelSpec {
        with_engine!(self, loaded => loaded.model.spec())
    }

    fn tokenizer(&self) -> PyResult<&Tokenizer> {
        with_engine!(self, loaded => loaded.require_tokenizer()).map_err(engine_error)
    }

    /// What the model runs on, in words.
    fn device(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".to_string(),
            Engine::Cuda(loaded) => loaded.model.backend().description().to_string(),
        }
    }
}

/// A loaded checkpoint, with the exit plan its outputs follow.
#[pyclass(module = "layerwise._native", frozen)]
struct Model {
    engine: Engine,
    plan: PlanOptions,
    /// An error raised by a Python contrast function, kept until the call that ran it returns.
    callback_error: Arc<Mutex<Option<PyErr>>>,
}

/// The plan named by the Python configuration's fields.
fn plan(
    mode: &str,
    layer: Option<usize>,
    upper: Option<&str>,
    lower: Option<usize>,
    projection: &str,
    contrast: Contrast,
) -> PyResult<PlanOptions> {
    let bad = |what: &str| LayerwiseError::new_err(what.to_string());
    let plan = match mode {
        "original" => ExitPlan::Original,
        "exit" => ExitPlan::Exit(layer.ok_or_else(|| bad("output_layer_index is required without the original head"))?),
        "contrast" => {
            let upper = match upper {
                Some("original") => Upper::Original,
                Some(u) => {
                    Upper::Layer(u.parse().map_err(|_| bad(&format!("contrast upper layer `{u}` is not a layer")))?)
                }
                None => return Err(bad("contrast_layer_indices needs an upper and a lower layer")),
            };
            let lower = lower.ok_or_else(|| bad("contrast_layer_indices needs a lower layer"))?;
            ExitPlan::Contrast { upper, lower }
        }
        other => return Err(bad(&format!("unknown plan `{other}`"))),
    };
    let projection = match projection {
        "layer_heads" | "heads" => Projection::ExitHeads,
        "lens" | "logit_lens" => Projection::Lens,
        "converted" | "conversion_matrices" => Projection::Converted,
        other => {
            return Err(bad(&format!(
                "vocab_projection_mode `{other}` is not one of layer_heads, logit_lens, conversion_matrices"
            )))
        }
    };
    Ok(PlanOptions { plan, projection, contrast })
}

#[pymethods]
impl Model {
    /// Loads `source` (a directory or a Hub id) on `device` (cpu, cuda, cuda:N, auto). `mode`:
    /// original, exit or contrast.
    #[staticmethod]
    #[pyo3(signature = (source, mode, layer=None, upper=None, lower=None, projection="layer_heads", alpha=0.1, min_candidates=1, contrast_function=None, dtype=None, adapter=None, device="cpu"))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        source: &str,
        mode: &str,
        layer: Option<usize>,
        upper: Option<String>,
        lower: Option<usize>,
        projection: &str,
        alpha: f32,
        min_candidates: usize,
        contrast_function: Option<PyObject>,
        dtype: Option<&str>,
        adapter: Option<PathBuf>,
        device: &str,
    ) -> PyResult<Model> {
        let weights = match dtype {
            None => None,
            Some(d) => Some(
                WeightFormat::parse(d)
                    .ok_or_else(|| LayerwiseError::new_err(format!("dtype `{d}` is not f32, f16, bf16 or q8")))?,
            ),
        };
        let callback_error: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
        let contrast = match contrast_function {
            None => Contrast::Acd { alpha, min_candidates },
            Some(function) => Contrast::Custom(Arc::new(python_contrast(function, Arc::clone(&callback_error)))),
        };
        let plan = plan(mode, layer, upper.as_deref(), lower, projection, contrast)?;
        let engine = py.allow_threads(|| Engine::open(source, device, weights, adapter.as_ref()))?;
        // The plan is checked against the checkpoint now, not at the first call.
        let options = DecoderOptions { plan: plan.clone(), cache_tokens: Some(1), ..Default::default() };
        with_engine!(&engine, loaded => EngineDecoder::new(&loaded.model, options).map(drop)).map_err(engine_error)?;
        Ok(Model { engine, plan, callback_error })
    }

    /// What the model runs on: `cpu`, or the GPU's description.
    #[getter]
    fn device(&self) -> String {
        self.engine.device()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.spec().vocab_size
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.engine.spec().num_layers
    }

    #[getter]
    fn max_positions(&self) -> usize {
        self.engine.spec().max_positions
    }

    #[getter]
    fn exit_layers(&self) -> Vec<usize> {
        self.engine.spec().exit_layers.clone()
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine.spec().eos_token_ids.clone()
    }

    #[getter]
    fn adapter(&self) -> Option<String> {
        with_engine!(&self.engine, loaded => loaded.adapter.clone())
    }

    #[getter]
    fn has_tokenizer(&self) -> bool {
        with_engine!(&self.engine, loaded => loaded.tokenizer.is_some())
    }

    /// `bos_token_id` of the checkpoint's config, if it names one.
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.engine.spec().bos_token_id
    }

    /// Token ids of `text` (the checkpoint's tokenizer), with the special tokens it adds by default
    /// unless `add_special_tokens` is false (transformers' `encode`).
    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let tokenizer = self.engine.tokenizer()?;
        if add_special_tokens { tokenizer.encode(text) } else { tokenizer.encode_plain(text) }.map_err(engine_error)
    }

    /// Text of `ids`, special tokens left out when `skip_special_tokens`.
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        let tokenizer = self.engine.tokenizer()?;
        tokenizer.decode_with(&ids, skip_special_tokens).map_err(engine_error)
    }

    /// lm-evaluation-harness's `_loglikelihood_tokens` for this model's plan: for each
    /// `(context, continuation)` pair of token lists, `(Σ log p(continuation | context), whether every
    /// continuation token is the argmax)`. The pair is cut to `max_length + 1` tokens from the left
    /// as the harness cuts it (default: the model's context). One forward pass per pair.
    #[pyo3(signature = (pairs, max_length=None))]
    fn loglikelihood(
        &self,
        py: Python<'_>,
        pairs: Vec<(Vec<u32>, Vec<u32>)>,
        max_length: Option<usize>,
    ) -> PyResult<Vec<(f64, bool)>> {
        let max_length = self.max_length(max_length)?;
        let mut out = Vec::with_capacity(pairs.len());
        for (i, (context, continuation)) in pairs.into_iter().enumerate() {
            if context.is_empty() || continuation.is_empty() {
                return Err(LayerwiseError::new_err(format!("pair {i}: the context and the continuation need tokens")));
            }
            if continuation.len() > max_length {
                return Err(LayerwiseError::new_err(format!(
                    "pair {i}: a continuation of {} tokens exceeds the context of {max_length}",
                    continuation.len()
                )));
            }
            // (context + continuation)[-(max_length + 1):]: the context loses its oldest tokens.
            let keep = (max_length + 1 - continuation.len()).min(context.len());
            let window = Window { context: context[context.len() - keep..].to_vec(), continuation };
            out.push(self.score(py, &window)?);
        }
        Ok(out.into_iter().map(|s| (s.loglikelihood, s.greedy)).collect())
    }

    /// lm-evaluation-harness's `loglikelihood_rolling`: each document's tokens scored in disjoint
    /// windows of `max_length` (the first after `prefix`), the log-likelihoods summed.
    #[pyo3(signature = (documents, prefix, max_length=None))]
    fn loglikelihood_rolling(
        &self,
        py: Python<'_>,
        documents: Vec<Vec<u32>>,
        prefix: u32,
        max_length: Option<usize>,
    ) -> PyResult<Vec<f64>> {
        let max_length = self.max_length(max_length)?;
        let mut out = Vec::with_capacity(documents.len());
        for tokens in documents {
            let mut total = 0.0;
            for window in rolling_windows(&tokens, prefix, max_length) {
                total += self.score(py, &window)?.loglikelihood;
            }
            out.push(total);
        }
        Ok(out)
    }

    /// One forward pass over `ids`: a dict of numpy arrays `logits [t, vocab]`, `exits {layer: [t,
    /// vocab]}`, `hidden_states` (a list of `[t, hidden]`), `plan [t, vocab]` (the configured plan's
    /// output), each only when asked for.
    #[pyo3(signature = (ids, logits=true, exits=Vec::new(), hidden_states=false, plan=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
        logits: bool,
        exits: Vec<usize>,
        hidden_states: bool,
        plan: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let request = ForwardRequest {
            logits,
            exits,
            hidden_states,
            plan: plan.then(|| self.plan.clone()),
            ..Default::default()
        };
        let engine = &self.engine;
        let out = py.allow_threads(|| with_engine!(engine, loaded => loaded.model.forward(&ids, &request)));
        let out = out.map_err(engine_error);
        self.raise_callback_error()?;
        let out = out?;
        let t = out.tokens;
        let matrix = |values: Vec<f32>| -> PyResult<Bound<'py, PyAny>> {
            let width = values.len().checked_div(t).unwrap_or(0);
            Ok(PyArray1::from_vec(py, values).reshape([t, width])?.into_any())
        };
        let dict = PyDict::new(py);
        if let Some(values) = out.logits {
            dict.set_item("logits", matrix(values)?)?;
        }
        let exit_dict = PyDict::new(py);
        for (layer, values) in out.exits {
            exit_dict.set_item(layer, matrix(values)?)?;
        }
        dict.set_item("exits", exit_dict)?;
        let states = out.hidden_states.into_iter().map(matrix).collect::<PyResult<Vec<_>>>()?;
        dict.set_item("hidden_states", states)?;
        if let Some(values) = out.plan {
            dict.set_item("plan", matrix(values)?)?;
        }
        Ok(dict)
    }

    /// The logit lens of `ids` as JSON text (the engine's `Lens`, as `layerwise lens --json` writes
    /// it). `decoder`: final, exits, converted, or blocks / sub-layers to run first.
    #[pyo3(signature = (ids, decoder="final", subblocks=false, top_k=5))]
    fn logit_lens(
        &self,
        py: Python<'_>,
        ids: Vec<u32>,
        decoder: &str,
        subblocks: bool,
        top_k: usize,
    ) -> PyResult<String> {
        let lens = with_engine!(&self.engine, loaded => {
            let model = &loaded.model;
            let decoder = LensDecoder::parse(model, decoder).map_err(engine_error)?;
            let options = LensOptions { decoder, subblocks, top_k };
            py.allow_threads(|| logit_lens(model, &ids, &options)).map_err(engine_error)?
        });
        serde_json::to_string(&lens).map_err(|e| LayerwiseError::new_err(e.to_string()))
    }

    /// Activations at named points (`embed`, `h.5`, `h.5.mlp`, ... in the checkpoint's names) as
    /// `{name: [t, width]}`, and attention probabilities of the given blocks as `{block: [heads, t,
    /// t]}`; no block above the deepest request runs.
    #[pyo3(signature = (ids, points=Vec::new(), attentions=Vec::new()))]
    fn inspect<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
        points: Vec<String>,
        attentions: Vec<usize>,
    ) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        let (parsed, inspection) = with_engine!(&self.engine, loaded => {
            let model = &loaded.model;
            let parsed = points.iter().map(|name| model.point(name)).collect::<layerwise::Result<Vec<_>>>();
            let parsed = parsed.map_err(engine_error)?;
            let request = InspectRequest { points: parsed.clone(), attentions, ..Default::default() };
            (parsed, py.allow_threads(|| model.inspect(&ids, &request)).map_err(engine_error)?)
        });
        let t = inspection.tokens;
        let activations = PyDict::new(py);
        for (name, point) in points.iter().zip(&parsed) {
            if let Some(values) = inspection.activations.get(point) {
                let width = values.len().checked_div(t).unwrap_or(0);
                activations.set_item(name, PyArray1::from_vec(py, values.clone()).reshape([t, width])?)?;
            }
        }
        let probabilities = PyDict::new(py);
        for (block, values) in inspection.attentions {
            let heads = values.len().checked_div(t * t).unwrap_or(0);
            probabilities.set_item(block, PyArray1::from_vec(py, values).reshape([heads, t, t])?)?;
        }
        Ok((activations, probabilities))
    }

    /// Generates for every prompt through the continuous-batching scheduler. `config`: transformers'
    /// generation fields as JSON text (over the checkpoint's generation_config.json). Returns, per
    /// prompt, `(sequences of new ids, finish reason)`. `on_tokens(index, ids)`, if given, is called
    /// with each prompt's new ids as they come; when it returns `True`, that prompt stops there
    /// (finish reason `stopped`).
    #[pyo3(signature = (prompts, config, batch_size=16, on_tokens=None))]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        config: &str,
        batch_size: usize,
        on_tokens: Option<PyObject>,
    ) -> PyResult<Vec<(Vec<Vec<u32>>, String)>> {
        let call = GenerateCall { prompts, config, batch_size, on_tokens };
        with_engine!(&self.engine, loaded => self.generate_on(loaded, py, call))
    }
}

/// The arguments of one [`Model::generate`] call.
struct GenerateCall<'a> {
    prompts: Vec<Vec<u32>>,
    config: &'a str,
    batch_size: usize,
    on_tokens: Option<PyObject>,
}

impl Model {
    /// [`Model::generate`] on one backend.
    fn generate_on<B: Backend>(
        &self,
        loaded: &LoadedModel<B>,
        py: Python<'_>,
        call: GenerateCall<'_>,
    ) -> PyResult<Vec<(Vec<Vec<u32>>, String)>> {
        let GenerateCall { prompts, config, batch_size, on_tokens } = call;
        let spec = loaded.model.spec();
        let json: serde_json::Value =
            serde_json::from_str(config).map_err(|e| LayerwiseError::new_err(format!("generation config: {e}")))?;
        let mut generation =
            GenerationConfig::for_checkpoint(spec, loaded.files.generation_config.as_deref()).map_err(engine_error)?;
        generation.apply_json(&json).map_err(engine_error)?;
        let options = generation.resolve().map_err(engine_error)?;
        // Slots for `batch_size` sequences, or one request's beams or candidates if it has more; a
        // cache that holds every slot's longest sequence, so nothing is preempted.
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + spec.virtual_tokens;
        let per_sequence = longest + options.max_new_tokens + 16;
        let widest_request = options.cache_tokens(longest) / per_sequence;
        let slots = batch_size.max(widest_request).max(1);
        let cache_tokens = slots * per_sequence;
        let decoder = EngineDecoder::new(
            &loaded.model,
            DecoderOptions { plan: self.plan.clone(), cache_tokens: Some(cache_tokens), ..Default::default() },
        )
        .map_err(engine_error)?;
        let scheduling = SchedulerOptions { max_sequences: slots, max_step_tokens: 512 };
        let mut scheduler = Scheduler::new(decoder, loaded.tokenizer.as_ref(), scheduling);
        let mut ids = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let id = scheduler.submit(Request { prompt, options: options.clone() }).map_err(engine_error)?;
            ids.push(id);
        }
        let mut results: Vec<Option<(Vec<Vec<u32>>, String)>> = vec![None; ids.len()];
        let mut finished = Vec::new();
        while !scheduler.is_idle() {
            let events = py.allow_threads(|| scheduler.step()).map_err(engine_error)?;
            self.raise_callback_error()?;
            for event in events {
                match event {
                    Event::Tokens { request, ids: new } => {
                        if let Some(callback) = &on_tokens {
                            let index = ids.iter().position(|&r| r == request).unwrap_or(0);
                            // A true answer is the caller's stop: the request ends with what it has.
                            let answer = callback.call1(py, (index, new))?;
                            if answer.extract::<bool>(py).unwrap_or(false) {
                                finished.extend(scheduler.cancel(request));
                            }
                        }
                    }
                    Event::Finished { .. } => finished.push(event),
                }
            }
            for event in finished.drain(..) {
                if let Event::Finished { request, result } = event {
                    let completion = result.map_err(engine_error)?;
                    let index = ids.iter().position(|&r| r == request).unwrap_or(0);
                    let g = completion.generation;
                    results[index] = Some((g.sequences, g.finish.name().to_string()));
                }
            }
            // Ctrl-C between steps.
            py.check_signals()?;
        }
        Ok(results.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// The scoring window: the model's context, or less when asked.
    fn max_length(&self, asked: Option<usize>) -> PyResult<usize> {
        let context = self.engine.spec().max_positions;
        match asked {
            None => Ok(context),
            Some(n) if n >= 1 && n <= context => Ok(n),
            Some(n) => Err(LayerwiseError::new_err(format!("max_length {n} is not within 1..={context}"))),
        }
    }

    /// One window scored under the plan, the GIL released; Ctrl-C is checked after it.
    fn score(&self, py: Python<'_>, window: &Window) -> PyResult<ContinuationScore> {
        let (engine, heads) = (&self.engine, Heads::Plan(Some(&self.plan)));
        let scores = py.allow_threads(|| with_engine!(engine, loaded => score_window(&loaded.model, heads, window)));
        self.raise_callback_error()?;
        py.check_signals()?;
        scores.map_err(engine_error)?.pop().ok_or_else(|| LayerwiseError::new_err("no score came back"))
    }

    fn raise_callback_error(&self) -> PyResult<()> {
        match self.callback_error.lock().map(|mut e| e.take()) {
            Ok(Some(error)) => Err(error),
            _ => Ok(()),
        }
    }
}

/// A Python `contrast_function(upper, lower) -> scores` over two numpy rows of logits, as a
/// contrast of the engine's. An exception is kept for the caller and the row filled with NaN (the
/// step then fails its finite check; the kept exception is what the call raises).
fn python_contrast(
    function: PyObject,
    errors: Arc<Mutex<Option<PyErr>>>,
) -> impl Fn(&[f32], &[f32], &mut [f32]) + Send + Sync {
    move |upper, lower, out| {
        let result = Python::with_gil(|py| -> PyResult<Vec<f32>> {
            let (u, l) = (PyArray1::from_slice(py, upper), PyArray1::from_slice(py, lower));
            let scores = function.call1(py, (u, l))?;
            let scores: Vec<f32> = scores.extract(py)?;
            if scores.len() != out.len() {
                return Err(LayerwiseError::new_err(format!(
                    "contrast_function returned {} scores for a vocabulary of {}",
                    scores.len(),
                    out.len()
                )));
            }
            Ok(scores)
        });
        match result {
            Ok(scores) => out.copy_from_slice(&scores),
            Err(e) => {
                out.fill(f32::NAN);
                if let Ok(mut slot) = errors.lock() {
                    slot.get_or_insert(e);
                }
            }
        }
    }
}

/// The step-by-step decoder over a model's paged cache.
#[pyclass(module = "layerwise._native", unsendable, subclass)]
struct Decoder {
    // Declared before `engine`: dropped first, while the model it borrows is alive.
    decoder: StepDecoder,
    engine: Engine,
}

/// The engine's decoder on the model's backend.
enum StepDecoder {
    Cpu(EngineDecoder<'static, Cpu>),
    Cuda(EngineDecoder<'static, Cuda>),
}

/// Evaluates `$body` with `$decoder` bound to the step decoder (by reference), whichever backend.
macro_rules! with_decoder {
    ($decoder:expr, $d:ident => $body:expr) => {
        match $decoder {
            StepDecoder::Cpu($d) => $body,
            StepDecoder::Cuda($d) => $body,
        }
    };
}

/// A decoder over `loaded`'s model that lives as long as the caller keeps `loaded` alive.
///
/// # Safety
/// The caller must hold the `Arc` (a clone of `loaded`) for at least as long as the decoder, and drop
/// the decoder first.
unsafe fn static_decoder<B: Backend>(
    loaded: &Arc<LoadedModel<B>>,
    options: DecoderOptions,
) -> layerwise::Result<EngineDecoder<'static, B>> {
    // SAFETY: the Arc's contents never move, and the caller keeps them alive past the decoder.
    let model: &'static layerwise::Model<B> = unsafe { &*(&loaded.model as *const layerwise::Model<B>) };
    EngineDecoder::new(model, options)
}

#[pymethods]
impl Decoder {
    #[new]
    #[pyo3(signature = (model, cache_tokens=None, block_size=16))]
    fn new(model: &Model, cache_tokens: Option<usize>, block_size: usize) -> PyResult<Decoder> {
        let engine = model.engine.clone();
        let options = DecoderOptions { plan: model.plan.clone(), block_size, cache_tokens, head_mask: None };
        // SAFETY: the Decoder keeps `engine` (the Arc the decoder borrows from) and drops the decoder
        // field first.
        let decoder = match &engine {
            Engine::Cpu(loaded) => unsafe { static_decoder(loaded, options) }.map(StepDecoder::Cpu),
            Engine::Cuda(loaded) => unsafe { static_decoder(loaded, options) }.map(StepDecoder::Cuda),
        };
        Ok(Decoder { decoder: decoder.map_err(engine_error)?, engine })
    }

    /// Starts a sequence; its prompt runs at the next step. Returns its handle.
    fn add_sequence(&mut self, ids: Vec<u32>) -> PyResult<u64> {
        let seq = with_decoder!(&mut self.decoder, d => d.add_sequence(&ids)).map_err(engine_error)?;
        Ok(handle(seq))
    }

    /// Runs every pending token; returns `{sequence: scores}` (numpy, `[vocab]`) for each sequence
    /// that ran.
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let decoder = &mut self.decoder;
        let outputs = py.allow_threads(|| with_decoder!(decoder, d => d.step())).map_err(engine_error)?;
        let dict = PyDict::new(py);
        for output in outputs {
            dict.set_item(handle(output.seq), PyArray1::from_vec(py, output.logits))?;
        }
        Ok(dict)
    }

    fn append(&mut self, seq: u64, token: u32) -> PyResult<()> {
        let seq = self.find(seq)?;
        with_decoder!(&mut self.decoder, d => d.append(seq, token)).map_err(engine_error)
    }

    /// A new sequence sharing `seq`'s cache blocks (copy on write).
    fn fork(&mut self, seq: u64) -> PyResult<u64> {
        let seq = self.find(seq)?;
        Ok(handle(with_decoder!(&mut self.decoder, d => d.fork(seq)).map_err(engine_error)?))
    }

    fn release(&mut self, seq: u64) -> PyResult<()> {
        let seq = self.find(seq)?;
        with_decoder!(&mut self.decoder, d => d.release(seq)).map_err(engine_error)
    }

    /// Every token of `seq` (prompt and appended).
    fn tokens(&self, seq: u64) -> PyResult<Vec<u32>> {
        let seq = self.find(seq)?;
        with_decoder!(&self.decoder, d => d.tokens(seq).map(<[u32]>::to_vec)).map_err(engine_error)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.spec().vocab_size
    }
}

impl Decoder {
    /// The engine's handle for a Python one; the decoder refuses handles it does not hold.
    fn find(&self, seq: u64) -> PyResult<SeqId> {
        Ok(SeqId::from_index(seq))
    }
}

fn handle(seq: SeqId) -> u64 {
    seq.index()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Decoder>()?;
    m.add("LayerwiseError", m.py().get_type::<LayerwiseError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
