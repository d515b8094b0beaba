"""The diffusion scheduler: admits requests by canvas and charges rows.

vLLM's Scheduler plans autoregressive steps (prefill chunks, one decode token
per step). A masked-diffusion request is different: its whole canvas
(`prompt + gen_length`) lives in the KV cache from the first step to the last,
and each step recomputes some rows of it. This scheduler keeps vLLM's request
bookkeeping (queues, KV cache manager, aborts, stats) and replaces planning:

* a request is admitted when its whole canvas fits in free KV blocks (allocated
  once, so a running request never needs more blocks: under FCFS nothing is
  ever preempted, requests queue);
* with `--scheduling-policy priority`, a waiting request that does not fit
  preempts running requests of lower priority (vLLM's recompute preemption):
  their blocks are freed, and when readmitted they denoise again from the
  start with the same seed; the blocks they had already emitted are checked
  against the recomputation and not sent twice;
* each step charges a request the rows it will compute (`next_num_rows`
  reported by the runner: the whole canvas without locking, only the unlocked
  rows with SureLock) against `max_num_batched_tokens`;
* no request starves another: running requests are offered the step's row
  budget least recently scheduled first, and a waiting request that did not
  fit the budget is admitted before the running ones at the next step, so a
  canvas near the context takes turns with short requests instead of holding
  the budget until it finishes;
* requests join and leave between diffusion steps (continuous batching at
  step granularity);
* a request whose diffusion options are invalid finishes with an error naming
  the option, without touching any other request.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from surelock_vllm.diffusion.options import InvalidDiffusionOption, length_option
from surelock_vllm.diffusion.flops import ComputeLedger, ModelShape
from surelock_vllm.engine.request_options import RESOLVED_KEY, guided_kv_tokens, guided_rows, resolve_request
from surelock_vllm.engine.settings import ServerSettings
from surelock_vllm.engine.special_tokens import special_tokens
from surelock_vllm.log import get_logger

logger = get_logger(__name__)


@dataclass
class DiffusionRequestRecord:
    """What the scheduler keeps per admitted diffusion request."""

    canvas_rows: int  # rows its first step computes: the whole canvas (twice with guidance)
    kv_tokens: int  # KV slots it holds while it runs (allocated at admission)
    next_num_rows: int  # rows it computes at its next step (its budget charge)
    arrival_step: int  # engine steps run before it arrived
    last_scheduled_step: int  # engine step it was last scheduled in (fairness order)
    steps_fixed: int  # steps of its fixed schedule (the ledger's baseline)
    # rows and FLOPs computed vs. the no-lock sampler
    ledger: ComputeLedger = field(default_factory=ComputeLedger)
    # after a preemption: tokens already sent, which the recomputation replays
    replay: list[int] = field(default_factory=list)


class DiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = ServerSettings.from_vllm_config(self.vllm_config)
        self.model_shape = ModelShape.from_config(self.vllm_config.model_config.hf_config)
        self.end_of_turn_id = special_tokens(self.vllm_config.model_config).eot_id
        self.records: dict[str, DiffusionRequestRecord] = {}
        # engine steps that scheduled anything, since the engine started
        self.engine_step = 0
        # the waiting request that did not fit the last step's row budget
        self._budget_blocked: str | None = None
        # all requests finished since the engine started, for the log line
        self.totals = ComputeLedger()
        self.finished_count = 0
        self._last_log = time.monotonic()
        self._logged_count = 0
        # requests refused at arrival: req_id -> error message
        self.rejected: dict[str, str] = {}
        # their outputs, sent with the next step's results
        self.pending_error_outputs: list[tuple[int, EngineCoreOutput]] = []

    # -- arrival ----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        try:
            if params is None:
                raise InvalidDiffusionOption("pooling_params", "LLaDA serves generation only")
            resolved = resolve_request(
                params,
                request.num_prompt_tokens,
                max_model_len=self.max_model_len,
                max_rows_per_step=self.max_num_scheduled_tokens,
                settings=self.settings,
                kv_block_size=self.cache_config.block_size,
            )
            canvas_len = request.num_prompt_tokens + resolved["options"]["gen_length"]
            guided = resolved["options"]["cfg_scale"] > 0
            kv_tokens = guided_kv_tokens(canvas_len, self.cache_config.block_size) if guided else canvas_len
            self._check_fits_kv_cache(kv_tokens, params, guided)
        except InvalidDiffusionOption as err:
            logger.warning("request %s rejected: %s", request.request_id, err)
            self.rejected[request.request_id] = str(err)
        else:
            params.extra_args = {**(params.extra_args or {}), RESOLVED_KEY: resolved}
            self._stop_at_end_of_turn(params)
            # The answer is at most the generated canvas.
            request.max_tokens = min(request.max_tokens, resolved["options"]["gen_length"])
            canvas_rows = guided_rows(canvas_len) if guided else canvas_len
            self.records[request.request_id] = DiffusionRequestRecord(
                canvas_rows=canvas_rows,
                kv_tokens=kv_tokens,
                next_num_rows=canvas_rows,
                arrival_step=self.engine_step,
                last_scheduled_step=self.engine_step,
                steps_fixed=resolved["options"]["steps"],
                ledger=ComputeLedger(steps_fixed=resolved["options"]["steps"]),
            )
        super().add_request(request)

    def _stop_at_end_of_turn(self, params) -> None:
        """Stop at `<|eot_id|>` as at EOS (special_tokens.py: LLaDA's generation_config
        lists only `<|endoftext|>`), as vLLM adds generation_config's extra EOS ids."""
        eot = self.end_of_turn_id
        if eot is None or params.ignore_eos or eot == params.eos_token_id:
            return
        if eot not in (params.stop_token_ids or ()):
            params.stop_token_ids = [*(params.stop_token_ids or ()), eot]
        params.all_stop_token_ids.add(eot)

    def _check_fits_kv_cache(self, kv_tokens: int, params, guided: bool) -> None:
        """A canvas (two with guidance) larger than the whole KV cache would wait forever."""
        block_size = self.cache_config.block_size
        needed = -(-kv_tokens // block_size)
        total = self.kv_cache_config.num_blocks - 1  # block 0 is vLLM's null block
        if needed > total:
            raise InvalidDiffusionOption(
                "cfg_scale" if guided else length_option(params.extra_args),
                f"the canvas needs {needed} KV blocks of {block_size} tokens; "
                f"the whole KV cache has {total}",
            )

    # -- planning ---------------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self._finish_rejected()
        plan = _StepPlan(self.max_num_scheduled_tokens)
        # A waiting request that the budget turned away last step goes first
        # now, so that running requests cannot keep it out for good.
        admit_first = bool(self.waiting) and self.waiting.peek_request().request_id == self._budget_blocked
        if admit_first:
            self._admit_waiting(plan)
        # Running requests, least recently scheduled first (arrival order
        # among equals); one that does not fit this step waits (its KV blocks
        # stay allocated) and comes first next time.
        for request in sorted(self.running, key=lambda r: self.records[r.request_id].last_scheduled_step):
            if request.request_id in plan.num_scheduled:
                continue  # admitted above
            rows = self.records[request.request_id].next_num_rows
            if rows <= plan.token_budget:
                plan.add(request, rows)
        if not admit_first:
            self._admit_waiting(plan)
        num_scheduled, running, new_requests = plan.num_scheduled, plan.running, plan.new_requests
        if num_scheduled:
            self.engine_step += 1
            for req_id in num_scheduled:
                self.records[req_id].last_scheduled_step = self.engine_step

        new_reqs_data = [
            NewRequestData.from_request(
                req, self.kv_cache_manager.get_block_ids(req.request_id)
            )
            for req in new_requests
        ]
        for req in new_requests:
            # its KV slots are all allocated and written by this step
            req.num_computed_tokens = self.records[req.request_id].kv_tokens
        cached = CachedRequestData(
            req_ids=[r.request_id for r in running],
            resumed_req_ids=set(),
            new_token_ids=[[] for _ in running],
            all_token_ids={},
            new_block_ids=[None for _ in running],
            num_computed_tokens=[r.num_computed_tokens for r in running],
            num_output_tokens=[r.num_output_tokens for r in running],
        )
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            preempted_req_ids=self.reset_preempted_req_ids,
        )
        self.finished_req_ids = set()
        self.reset_preempted_req_ids = set()
        return output

    def _admit_waiting(self, plan: "_StepPlan") -> None:
        """Admit waiting requests, in queue order, while rows and KV blocks last."""
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            record = self.records[request.request_id]
            rows = record.next_num_rows
            if rows > plan.token_budget:
                self._budget_blocked = request.request_id
                break
            blocks = self.kv_cache_manager.allocate_slots(request, record.kv_tokens)
            while blocks is None and (victim := self._preemption_victim(request)) is not None:
                self._preempt(victim, plan)
                blocks = self.kv_cache_manager.allocate_slots(request, record.kv_tokens)
            if blocks is None:
                break  # KV cache full: wait for a running request to finish
            self.waiting.pop_request()
            if self._budget_blocked == request.request_id:
                self._budget_blocked = None
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.add(request, rows, new=True)

    # -- preemption (priority scheduling only) ------------------------------------
    def _preemption_victim(self, request: Request) -> Request | None:
        """The lowest-priority running request below `request`, if any.

        Under FCFS nothing is preempted: running requests never need more
        blocks, so preempting one would only restart it for a later arrival.
        """
        if self.policy != SchedulingPolicy.PRIORITY:
            return None
        key = (request.priority, request.arrival_time)
        lower = [r for r in self.running if (r.priority, r.arrival_time) > key]
        return max(lower, key=lambda r: (r.priority, r.arrival_time)) if lower else None

    def _preempt(self, victim: Request, plan: "_StepPlan") -> None:
        """Preempt `victim` (vLLM's recompute preemption); its rows go back to the budget."""
        req_id = victim.request_id
        self.running.remove(victim)
        plan.remove(victim)
        record = self.records[req_id]
        # It denoises again from the start (same seed); what it already sent
        # is replayed by the recomputation and not sent twice.
        record.replay = list(victim.output_token_ids)
        record.next_num_rows = record.canvas_rows
        record.ledger = ComputeLedger(steps_fixed=record.steps_fixed)  # accounting of the run that answers
        logger.info("request %s preempted by a higher-priority request; it will restart", req_id)
        self._preempt_request(victim, time.monotonic())  # frees blocks, back to waiting

    def _skip_replayed(self, req_id: str, new_token_ids: list[int]) -> list[int]:
        """Drop the tokens a preempted request had already sent before it restarted."""
        replay = self.records[req_id].replay
        n = min(len(replay), len(new_token_ids))
        if new_token_ids[:n] != replay[:n]:
            logger.warning(
                "request %s: after preemption, the recomputed tokens differ from those already "
                "sent; the client keeps the first ones", req_id,
            )
        del replay[:n]
        return new_token_ids[n:]

    # -- results ----------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        next_rows = getattr(model_runner_output, "next_num_rows", {})
        step_stats = getattr(model_runner_output, "step_stats", {})
        stopped_reqs: list[Request] = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue  # aborted while the step ran
            record = self.records[req_id]
            if req_id in step_stats:
                record.ledger.add_step(self.model_shape, **step_stats[req_id])
            index = model_runner_output.req_id_to_index[req_id]
            new_token_ids = list(model_runner_output.sampled_token_ids[index])
            if new_token_ids and record.replay:
                new_token_ids = self._skip_replayed(req_id, new_token_ids)
            stopped = False
            if new_token_ids:
                new_token_ids, stopped = self._update_request_with_output(
                    request, new_token_ids
                )
            if req_id in next_rows:
                record.next_num_rows = next_rows[req_id]
            elif not stopped:
                # The canvas is fully denoised: the answer is complete.
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
                stopped = True
            if stopped:
                stopped_reqs.append(request)
            if new_token_ids or stopped:
                outputs[request.client_index].append(
                    EngineCoreOutput(
                        request_id=req_id,
                        new_token_ids=new_token_ids,
                        finish_reason=request.get_finished_reason(),
                        stop_reason=request.stop_reason,
                        events=request.take_events(),
                        trace_headers=request.trace_headers,
                        kv_transfer_params=self._final_stats(req_id) if stopped else None,
                    )
                )
        if stopped_reqs:
            stopped_set = set(stopped_reqs)
            self.running = [r for r in self.running if r not in stopped_set]
            for request in stopped_reqs:
                self._account_finished(request.request_id)
                self._forget(request.request_id)
                self._free_request(request)
        self._maybe_log_totals()

        for out in self.pending_error_outputs:
            outputs[out[0]].append(out[1])
        self.pending_error_outputs.clear()
        return self._engine_core_outputs(outputs)

    def _finish_rejected(self) -> None:
        """Finish requests refused at arrival; their error names the option."""
        if not self.rejected:
            return
        requests = [self.requests[r] for r in self.rejected if r in self.requests]
        self.waiting.remove_requests(requests)
        for request in requests:
            message = self.rejected.pop(request.request_id)
            request.status = RequestStatus.FINISHED_ERROR
            request.stop_reason = message
            self._forget(request.request_id)
            self._free_request(request)
            self.pending_error_outputs.append(
                (
                    request.client_index,
                    EngineCoreOutput(
                        request_id=request.request_id,
                        new_token_ids=[],
                        finish_reason=request.get_finished_reason(),
                        stop_reason=message,
                        events=request.take_events(),
                        trace_headers=request.trace_headers,
                    ),
                )
            )

    def _engine_core_outputs(self, outputs) -> dict[int, EngineCoreOutputs]:
        engine_core_outputs = {
            client: EngineCoreOutputs(outputs=outs) for client, outs in outputs.items()
        }
        finished = self.finished_req_ids_dict
        if finished:
            for client, finished_set in finished.items():
                if (eco := engine_core_outputs.get(client)) is not None:
                    eco.finished_requests = finished_set
                else:
                    engine_core_outputs[client] = EngineCoreOutputs(
                        finished_requests=finished_set
                    )
            finished.clear()
        if (stats := self.make_stats()) is not None:
            if (eco := next(iter(engine_core_outputs.values()), None)) is None:
                engine_core_outputs[0] = eco = EngineCoreOutputs()
            eco.scheduler_stats = stats
        return engine_core_outputs

    # -- aborts -----------------------------------------------------------------
    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        for request in finished:
            self._forget(request.request_id)
        return finished

    def _final_stats(self, req_id: str) -> dict:
        """Per-request accounting, delivered on the finished RequestOutput.

        vLLM has no per-request field for plugin data; `kv_transfer_params` is
        the one dict that travels from EngineCoreOutput to RequestOutput and
        into OpenAI responses (see vllm_internals.py). Nothing else reads it
        unless a KV connector is configured, which this engine refuses.
        """
        record = self.records.get(req_id)
        if record is None:
            return {}
        record.ledger.engine_steps = self.engine_step - record.arrival_step
        return {"surelock": record.ledger.as_dict()}

    def _account_finished(self, req_id: str) -> None:
        record = self.records.get(req_id)
        if record is None:
            return
        ledger = record.ledger
        self.finished_count += 1
        self.totals.merge(ledger)
        logger.debug("request %s: %s", req_id, ledger.summary())

    def _maybe_log_totals(self, every_s: float = 10.0) -> None:
        now = time.monotonic()
        # at most every `every_s`, and only when more requests have finished
        if now - self._last_log < every_s or self.finished_count == self._logged_count:
            return
        self._last_log, self._logged_count = now, self.finished_count
        logger.info("SureLock, %d finished requests: %s", self.finished_count, self.totals.summary())

    def _forget(self, req_id: str) -> None:
        self.records.pop(req_id, None)
        self.rejected.pop(req_id, None)
        if self._budget_blocked == req_id:
            self._budget_blocked = None


class _StepPlan:
    """The requests one engine step schedules, and the row budget left."""

    def __init__(self, token_budget: int):
        self.token_budget = token_budget
        self.num_scheduled: dict[str, int] = {}
        self.running: list[Request] = []  # already running before this step
        self.new_requests: list[Request] = []  # admitted this step

    def add(self, request: Request, rows: int, new: bool = False) -> None:
        self.num_scheduled[request.request_id] = rows
        self.token_budget -= rows
        (self.new_requests if new else self.running).append(request)

    def remove(self, request: Request) -> None:
        self.token_budget += self.num_scheduled.pop(request.request_id, 0)
        for group in (self.running, self.new_requests):
            if request in group:
                group.remove(request)
