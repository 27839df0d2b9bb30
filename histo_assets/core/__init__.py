"""Framework-free imaging and ML code; everything here can be used and tested without Dagster."""

import os

# transformers warns on every import that torchvision is absent; it is absent on purpose (it
# breaks torchmetrics here) and nothing in this project needs it. Set before any submodule
# imports transformers or diffusers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
