"`ulmfit-tx export-onnx`: a classifier bundle's ONNX graph for ONNX Runtime, checked against PyTorch."

from ._options import add_model

HELP = "a classifier bundle's ONNX graph for ONNX Runtime, checked against PyTorch"


def add_arguments(p):
    add_model(p, "a bundle folder (train-clf's output, or learn.export_bundle)")
    p.add_argument("--int8", action="store_true", help="quantize the weights of the matrix products to int8 (dynamic)")
    p.add_argument(
        "--out",
        help="the .onnx file (default: MODEL/model.onnx, or MODEL/model.int8.onnx with --int8); "
        "the config, tokenizer and ulmfit_tx.json are kept beside it",
    )
    p.add_argument("--force", action="store_true", help="replace an existing ONNX file")
    p.add_argument(
        "--portable",
        action="store_true",
        help="standard ONNX operators only, for runtimes other than ONNX Runtime (by default a Hugging Face "
        "encoder's self-attention is ONNX Runtime's fused Attention node)",
    )


def run(a) -> dict:
    from pathlib import Path

    from ..export import ONNX_FILES
    from ..learner import load_classifier

    out = a.out or Path(a.model) / ONNX_FILES[a.int8]
    res = load_classifier(a.model).export_onnx(out, a.int8, force=a.force, portable=a.portable)
    print(
        f"{'int8' if a.int8 else 'float32'} ONNX model ({res['mb']:.1f} MB) in {res['seconds']:.1f}s -> {out}\n"
        f"checked against PyTorch on sample texts: probabilities within {res['max_abs_diff']:.1e}, "
        f"{res['agreement']:.0%} of labels equal"
    )
    return res
