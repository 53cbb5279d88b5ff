"""`import pyddl.tensorflow.keras as hvd`: Horovod's horovod.tensorflow.keras path; the same
API as pyddl.keras."""

from pyddl.keras import *  # noqa: F401,F403
from pyddl.keras import __all__  # noqa: F401
from pyddl.keras import callbacks  # noqa: F401
