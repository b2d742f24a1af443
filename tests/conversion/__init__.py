"""The graph pass: site kinds, filters, dense sampling and its phases, old and odd graphs (aa_deploy/conversion)."""
