"""The core tier: the SAE maths (`sae`), language models and their hooks (`models`), text and labelled data (`data`),
training (`train`), SAE file formats and run folders (`io`), and the small utilities every tier shares (errors,
validation, files, caches, system facts). The core imports nothing above it."""
