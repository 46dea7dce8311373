"""The host side of the engine: sequences, the KV page pool, the scheduler and the step plan.

numpy only: nothing under `fastgen_jax.engine` imports jax, so scheduling can be tested and reasoned
about without a device. One step, as `llm_engine` drives it:

    budget = controller.choose_for(running)     # with an adaptive budget: this step's token budget
    output = scheduler.schedule(budget)        # which tokens of which sequences
    plan = planner.build(output)               # StepPlan: every array of the compiled step, numpy
    sampled = runner.execute(plan)[0]          # device: model + sampling -> i32[S]
    scheduler.postprocess(output, sampled, now)  # advance computed tokens, append sampled ones, and
                                                 # note their time in each seq.timing (RequestTiming)
    # then check stop conditions and call scheduler.finish(seq, reason) for the finished ones
"""

from fastgen_jax.engine.batch import AttentionMetadata, SamplingArrays, StepPlan, StepPlanner
from fastgen_jax.engine.budget import BudgetController, StepTimeModel
from fastgen_jax.engine.limits import EngineLimits, RequestError, check_request
from fastgen_jax.engine.page_allocator import NULL_PAGE, OutOfPagesError, PageAllocator, PageTables
from fastgen_jax.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from fastgen_jax.engine.sequence import Sequence, SequenceStatus, pages_for
from fastgen_jax.engine.sla_policy import SlaComposer
from fastgen_jax.engine.timing import RequestSLA, RequestTiming

__all__ = [
    "AttentionMetadata",
    "SamplingArrays",
    "BudgetController",
    "EngineLimits",
    "NULL_PAGE",
    "OutOfPagesError",
    "PageAllocator",
    "PageTables",
    "RequestError",
    "RequestSLA",
    "RequestTiming",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "SlaComposer",
    "StepPlan",
    "StepPlanner",
    "StepTimeModel",
    "check_request",
    "pages_for",
]
