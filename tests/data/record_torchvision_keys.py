"""Records the state-dict layout of torchvision's ImageNet models that oat_jax mirrors, so the tests can
check the Flax conversions against torchvision without importing it (torchvision is a large install).

Writes ``torchvision_keys/<model>.json`` beside this script, one file per model:
``{"model": ..., "torchvision_version": ..., "num_parameters": ..., "state_dict": {key: shape list}}``
where ``state_dict`` lists every entry of ``model.state_dict()`` (buffers included) in torchvision's order
and ``num_parameters`` counts the trainable parameters (buffers excluded), both with the 1000-class head.

Run it from the repository root with torchvision installed: ``python tests/data/record_torchvision_keys.py``.
"""
import json
import pathlib

import torchvision

MODELS = ("resnet18", "wide_resnet50_2", "vit_l_16")
OUT_DIR = pathlib.Path(__file__).resolve().parent / "torchvision_keys"


def layout(name: str) -> dict:
    """The state-dict names and shapes of torchvision's ``name`` with random weights (nothing downloaded)."""
    model = torchvision.models.get_model(name, weights=None)
    return {
        "model": name,
        "torchvision_version": torchvision.__version__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": {key: list(tensor.shape) for key, tensor in model.state_dict().items()},
    }


def to_json(record: dict) -> str:
    """JSON with one state-dict entry a line, so that diffs between torchvision versions read easily."""
    def lines(pairs, indent):
        return ",\n".join(f"{indent}{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs)
    header = lines(((key, value) for key, value in record.items() if key != "state_dict"), " ")
    entries = lines(record["state_dict"].items(), "  ")
    return f'{{\n{header},\n "state_dict": {{\n{entries}\n }}\n}}\n'


def main():
    OUT_DIR.mkdir(exist_ok=True)
    for name in MODELS:
        path = OUT_DIR / f"{name}.json"
        path.write_text(to_json(layout(name)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
