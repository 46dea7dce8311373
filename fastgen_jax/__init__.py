"""fastgen-jax: Dynamic SplitFuse text generation on JAX/XLA."""
