"""A trained lmforge model as an MLflow pyfunc model.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    model.predict(["abraham"])                   # -> list of answers (or labels), as `lmforge generate`
    model.predict(pd.DataFrame({"prompt": [...]}))
    model.predict(["Once upon a time"], params={"raw": True})  # the text continued as given

Prompts are rendered as `lmforge generate RUN PROMPT` renders them by default
(`lmforge.eval.generation.as_trained`): through the run's data.template for a prompt-completion,
alpaca or seq2seq run ("Spell {prompt}:\\n" turns "abraham" into "Spell abraham:\\n"), through the
chat template saved with the tokenizer for a chat run, as given for plain text; answers are cut
and ended as the run's lmforge_generation.json says. `params={"raw": True}` sends the text as
given, as `lmforge generate --raw` does. `max_new_tokens` and `temperature` may be given in params
too (default: the run's eval.generate).

The model directory is the exported Hugging Face directory (safetensors, tokenizer, model card);
beside it `generate.json` (the run's eval.generate) and `prompting.json` (the data settings that
render a prompt: data.format, template, columns, chat_template). A model saved before
prompting.json existed sends prompts as given. Loading needs lmforge installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc

import lmforge

PROMPTING_FIELDS = ("format", "template", "columns", "chat_template", "text_field", "loss_on")
"""The run's data settings that `as_trained` reads to render a prompt (prompting.json)."""


class LmforgeModel(mlflow.pyfunc.PythonModel):
    """Generates an answer for each prompt, rendered as the run was trained (causal LM, seq2seq),
    or predicts its label (classification)."""

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
        prompting = context.artifacts.get("prompting")
        self.run_config = prompting_config(json.loads(Path(prompting).read_text())) if prompting else None

    def predict(
        self, context, model_input, params: dict | None = None
    ) -> list[str]:  # no hint: MLflow would validate it
        """The answer to each prompt of `model_input` (a list of strings, a string, or a DataFrame:
        its "prompt" column, else its first).

        Args:
            params: raw (send the text as given), max_new_tokens, temperature.
        """
        from lmforge.eval.generation import as_trained, respond

        if hasattr(model_input, "columns"):
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        options = dict(params or {})
        raw = bool(options.pop("raw", False))
        settings = self.generate.model_validate({**self.generate.model_dump(), **options})
        if raw:  # as `lmforge generate --raw`: no template, no hints
            return respond(self.model, self.tokenizer, prompts, settings, seed=0)
        shown = [as_trained(p, self.run_config, self.tokenizer, chat=False) for p in prompts]
        return respond(self.model, self.tokenizer, shown, settings, seed=0, hints=self.hints)


def prompting_config(saved: dict):
    """A stand-in for the run's config that `as_trained` reads: `.data` with the saved prompting
    settings (the training data's location is not needed to render a prompt, and not saved)."""
    from lmforge.config import DataConfig

    return SimpleNamespace(data=DataConfig.model_validate({"train": "(not saved)", **saved}))


def save_pyfunc(target: Path, path: Path) -> Path:
    """Write an MLflow pyfunc model of `target` (a finished run, a paused run or a checkpoint) to
    `path`; a LoRA adapter is merged so that the model stands alone. Its prompts are rendered as
    the run's were (the module's docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    from lmforge.config import saved_config
    from lmforge.eval.target import resolve_target
    from lmforge.export.export import export_run

    kind, model_dir = resolve_target(Path(target))
    settings = model_dir.parent if kind == "run" else model_dir  # a checkpoint holds its config.yaml
    config = saved_config(settings / "config.yaml")
    staging = path.parent / "staging"
    hf_dir = export_run(Path(target), staging / "hf_model", merge_lora=config.lora is not None)
    generate = staging / "generate.json"
    generate.write_text(config.eval.generate.model_dump_json())
    prompting = staging / "prompting.json"
    prompting.write_text(json.dumps(config.data.model_dump(mode="json", include=set(PROMPTING_FIELDS))))
    params = ParamSchema(
        [
            ParamSpec("raw", "boolean", False),
            ParamSpec("max_new_tokens", "long", config.eval.generate.max_new_tokens),
            ParamSpec("temperature", "double", config.eval.generate.temperature),
        ]
    )
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=LmforgeModel(),
        artifacts={"hf_model": str(hf_dir), "generate": str(generate), "prompting": str(prompting)},
        signature=ModelSignature(params=params),
        pip_requirements=[f"lmforge=={lmforge.__version__}"],
    )
    return path
