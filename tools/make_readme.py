"""Write README.md from nbs/index.ipynb (its source), running the code cells so their printed output appears too.

nbdev-readme needs Quarto, which cannot be installed offline here; this does the same for our plain markdown."""
from pathlib import Path
from fastcore.nbio import read_nb
from execnb.shell import CaptureShell

root = Path(__file__).resolve().parent.parent
nb = read_nb(root / "nbs" / "index.ipynb")
CaptureShell(path=root / "nbs").run_all(nb)
parts = []
for cell in nb.cells:
    if cell.cell_type == "markdown": parts.append(cell.source)
    elif cell.cell_type == "code" and not cell.source.lstrip().startswith("#| hide"):
        parts.append(f"```python\n{cell.source}\n```")
        # stdout and results only: stderr holds progress bars and notes that depend on the machine's caches (a
        # first load converts the embedded model and says so)
        text = "".join("".join(o.get("text", "")) if o.get("output_type") == "stream" and o.get("name") == "stdout"
                       else "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))
        if text.strip(): parts.append(f"```\n{text.strip()}\n```")
(root / "README.md").write_text("\n\n".join(parts) + "\n")
print("wrote README.md")
