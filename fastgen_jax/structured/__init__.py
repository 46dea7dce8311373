"""Structured outputs: constrain what a request may generate (JSON schema, regex, choice, grammar).

Host side only (numpy, never jax). `StructuredOutputs` is what a request asks for; `GuidedDecoder`
(one per engine) compiles it with llguidance into a grammar (cached), keeps one matcher per
constrained sequence, fills the step's token bitmask and advances each matcher with the token the
device sampled. `tools` turns OpenAI function tools into prompts, constraints and parsed calls.
"""

from fastgen_jax.structured.guided import GuidedDecoder
from fastgen_jax.structured.params import StructuredOutputs, StructuredOutputsError

__all__ = ["GuidedDecoder", "StructuredOutputs", "StructuredOutputsError"]
