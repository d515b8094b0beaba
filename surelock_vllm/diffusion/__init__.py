"""The masked-diffusion algorithm in plain torch (no vLLM import).

`options`  : per-request diffusion options and their validation.
`denoiser` : one request's canvas and the LLaDA unmasking rule, step by step.
"""
