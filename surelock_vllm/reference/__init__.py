"""Plain-torch LLaDA and the LLaDA reference sampler: the test oracle.

Nothing here imports vLLM: this is LLaDA as its authors run it, used to check
that the vLLM path produces the same logits and the same tokens.
"""
