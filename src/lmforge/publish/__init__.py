"""From a run to its users: `lmforge push` (Hugging Face Hub, S3, MLflow registry), `lmforge pull`,
and checkpoints mirrored off the machine (`train.mirror`)."""
