"""vLLM glue: the diffusion scheduler, runner and workers."""
