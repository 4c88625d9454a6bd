from pathlib import Path

from keyart.contracts import render_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_data_contracts_doc_is_generated_from_the_code():
    doc = (ROOT / "docs" / "data-contracts.md").read_text()
    assert render_markdown().strip() in doc, "regenerate: python -m keyart.contracts"
