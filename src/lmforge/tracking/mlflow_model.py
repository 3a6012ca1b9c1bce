"""A trained lmforge model as an MLflow pyfunc model.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    model.predict(["Once upon a time"])          # -> list of continuations (or labels)
    model.predict(pd.DataFrame({"prompt": [...]}))

The model directory is the exported Hugging Face directory (safetensors, tokenizer, model card);
generation settings come from the run's eval.generate. Loading needs lmforge installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

import lmforge


class LmforgeModel(mlflow.pyfunc.PythonModel):
    """Generates a continuation for each prompt (causal LM, seq2seq) or predicts its label
    (classification)."""

    def load_context(self, context) -> None:
        from lmforge.config import GenerateConfig
        from lmforge.eval.generation import read_hints
        from lmforge.eval.target import load_model_dir
        from lmforge.models.build import task_of
        from lmforge.models.tokenizer import load_tokenizer

        model_dir = Path(context.artifacts["hf_model"])
        self.model = load_model_dir(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir, need_eos=task_of(model_dir) != "classification")
        settings = json.loads(Path(context.artifacts["generate"]).read_text())
        self.generate = GenerateConfig.model_validate(settings)
        self.hints = read_hints(model_dir)  # prompts cut as the run's answers were; chat turns end

    def predict(
        self, context, model_input, params: dict | None = None
    ) -> list[str]:  # no hint: MLflow would validate it
        from lmforge.eval.generation import respond

        if hasattr(model_input, "columns"):  # a DataFrame: its "prompt" column, else its first
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        settings = self.generate.model_copy(update=params or {})
        return respond(self.model, self.tokenizer, prompts, settings, seed=0, hints=self.hints)


def save_pyfunc(target: Path, path: Path) -> Path:
    """Write an MLflow pyfunc model of `target` (a finished run, a paused run or a checkpoint) to
    `path`; a LoRA adapter is merged so that the model stands alone."""
    import yaml

    from lmforge.config import Config
    from lmforge.eval.target import resolve_target
    from lmforge.export.export import export_run

    kind, model_dir = resolve_target(Path(target))
    settings = model_dir.parent if kind == "run" else model_dir  # a checkpoint holds its config.yaml
    config = Config.model_validate(yaml.safe_load((settings / "config.yaml").read_text()))
    staging = path.parent / "staging"
    hf_dir = export_run(Path(target), staging / "hf_model", merge_lora=config.lora is not None)
    generate = staging / "generate.json"
    generate.write_text(config.eval.generate.model_dump_json())
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=LmforgeModel(),
        artifacts={"hf_model": str(hf_dir), "generate": str(generate)},
        pip_requirements=[f"lmforge=={lmforge.__version__}"],
    )
    return path
