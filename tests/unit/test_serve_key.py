"""Which API key `lmforge serve` requires."""


def test_serve_takes_lmforge_api_key_by_default_and_it_is_no_config_override(monkeypatch, tmp_path):
    from lmforge.config import load_config
    from lmforge.serve.app import api_key_from

    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert api_key_from(None) is None  # open, and the server says so
    monkeypatch.setenv("LMFORGE_API_KEY", " s3cret-key-value ")
    assert api_key_from(None) == "s3cret-key-value"
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.txt}\nmodel: {preset: llama-tiny}\ntokenizer: {train: true}\n")
    assert load_config(path).name == "run"  # LMFORGE_API_KEY is not read as a config key
