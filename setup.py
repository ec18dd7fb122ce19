"Packaging that reads everything from settings.ini (nbdev style)."

from configparser import ConfigParser

from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini")
c = cfg["DEFAULT"]

setup(
    name=c["lib_name"],
    version=c["version"],
    description=c["description"],
    keywords=c["keywords"].split(),
    author=c["author"],
    license=c["license"],
    python_requires=f">={c['min_python']}",
    packages=find_packages(include=[c["lib_name"], f"{c['lib_name']}.*"]),
    install_requires=[c["torch_requirement"], *c["requirements"].split()],
    extras_require={
        "dev": c["dev_requirements"].split(),
        "onnx": c["onnx_requirements"].split(),
        "report": c["report_requirements"].split(),
        "serve": c["serve_requirements"].split(),
    },
    entry_points={"console_scripts": c["console_scripts"].split()},
)
