//! CUDA kernels for layerwise (placeholder).
