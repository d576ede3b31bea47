"""`python -m agentc.data.import --format F IN OUT`: the command line of data/importers.py (a module
named `import` cannot be imported by name, so the code lives there)."""
from agentc.data.importers import main
from agentc.util import run_main

if __name__ == "__main__":
    run_main(main, "agentc.data.import")
