__version__ = "0.1.0"
# The MindSpore releases this package supports (setup.py's requirement; checked at import by compat.py). On Ascend
# the MindSpore release is tied to the CANN toolkit and driver installed: keep the range as wide as is tested.
MINDSPORE_REQUIRES = ">=2.7.0,<2.11"
