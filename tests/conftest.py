import os
import sys

# Tests import the checkout, not an installed copy elsewhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
