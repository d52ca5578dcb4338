"""`python -m ifw.crds` rewrites the CRD from the pydantic models: crds/ and the Helm chart's copy."""

from ifw.crds.generate import CRD_PATH, render

HELM_COPY = CRD_PATH.parents[1] / "helm" / "ifw" / "crds" / CRD_PATH.name

if __name__ == "__main__":
    text = render()
    for path in (CRD_PATH, HELM_COPY):
        if path.parent.is_dir():
            path.write_text(text)
            print(f"wrote {path}")
