"""Gradio demos of a run: `raft demo chat --run DIR` (text) and `raft demo image --run DIR` (diffusion).

Both show the base model and the aligned one side by side on the same input, each output with its reward
from the run's own rankers. Gradio is the `demo` extra (pip install 'raft-align[demo]').
"""

import os

# no usage statistics or version checks sent anywhere: set before gradio is imported and read when an app is built
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
