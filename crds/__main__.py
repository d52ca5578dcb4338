"""`python -m ifw.crds` rewrites crds/transcriptionjob.yaml from the pydantic models."""

from ifw.crds.generate import CRD_PATH, render

if __name__ == "__main__":
    CRD_PATH.write_text(render())
    print(f"wrote {CRD_PATH}")
