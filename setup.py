"""The one compiled part: config/_yamlc.c (plain YAML data from libyaml's events).

Optional: without a C compiler or libyaml's header (Debian: libyaml-dev) the build goes on
without it, and config/yamlsrc.py parses with PyYAML's nodes (same results, slower).
The extension links no library: it calls the libyaml inside PyYAML's own C module.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "xdsplane.config._yamlc",
            ["xdsplane/config/_yamlc.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
