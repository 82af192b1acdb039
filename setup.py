"""Package metadata; the pinned stack is read from requirements.txt."""
from pathlib import Path

from setuptools import find_packages, setup


def pinned_requirements():
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="lm1b_hvd",
    version="0.1.0",
    description="LSTM language models on the One Billion Word benchmark, trained with Horovod",
    packages=find_packages(include=["lm1b_hvd", "lm1b_hvd.*"]),
    python_requires=">=3.9,<3.12",
    install_requires=pinned_requirements(),
    entry_points={
        "console_scripts": [
            "lm1b-train=lm1b_hvd.train:main",
            "lm1b-evaluate=lm1b_hvd.evaluate:main",
            "lm1b-prepare-data=lm1b_hvd.prepare_data:main",
            "lm1b-benchmark-data=lm1b_hvd.benchmark_data:main",
            "lm1b-bench=lm1b_hvd.bench:main",
            "lm1b-score=lm1b_hvd.score:main",
            "lm1b-sample=lm1b_hvd.sample:main",
            "lm1b-export=lm1b_hvd.export:main",
        ]
    },
)
