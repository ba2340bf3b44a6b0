import os
import sys

# the scripts live at the repo root and are imported by name, like `python script.py` would see them
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
