import os
import sys

# Tests spawn worker processes that import these helpers by module name.
sys.path.insert(0, os.path.dirname(__file__))
