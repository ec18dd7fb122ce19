"The installed version of ulmfit_tx: settings.ini is its one source, copied into the package metadata at install."

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ulmfit_tx")
except PackageNotFoundError:
    __version__ = "0+unknown"  # a source tree that was never installed
