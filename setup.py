"""Build of the rtp_core C extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rtp_core._core",
            sources=[
                "rtp_core/_core.c",
                "rtp_core/engine.c",
                "rtp_core/uring.c",
                "rtp_core/packet.c",
                "rtp_core/recorder.c",
                "rtp_core/codec.c",
            ],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
