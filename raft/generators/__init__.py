"""Generators beyond the policy, and the pieces that combine them; generation is decoupled from training.

- `SamplingPrompt` (prompts.py): magic prompts, sent when sampling and dropped from the fine-tuning pairs.
- `Mixture` (mixture.py): several generators, each supplying its share of the K samples of every prompt.
- `FileSampler` (file.py): pre-generated (prompt, response) rows from a file or a dataset.
- `OpenAICompatibleSampler` (openai_http.py): an OpenAI-compatible server over HTTP.
- `VLLMSampler` (vllm_sampler.py): vLLM in this process (optional extra; imported only when built).

Modalities build these from their config (e.g. raft/modalities/text/generators.py); the loop only sees a
`Generator`. Every sample records `generator`, `prompt_sent` and `settings` in its meta.
"""

from raft.generators.file import FileSampler
from raft.generators.mixture import Mixture
from raft.generators.openai_http import OpenAICompatibleSampler
from raft.generators.prompts import SamplingPrompt, apply_template
from raft.generators.sampling import SamplingSettings
from raft.shares import split_counts

__all__ = ["FileSampler", "Mixture", "OpenAICompatibleSampler", "SamplingPrompt", "SamplingSettings",
           "apply_template", "split_counts"]
