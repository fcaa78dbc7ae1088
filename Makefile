# Debian packages of ab-flasher (see docs/packaging.md).
#
#   make deb          the release package: debian/ (debhelper + dh-python/pybuild) -> $(DIST_DIR)/ab-flasher_*_all.deb
#   make deb-stdeb    the stdeb convenience package -> $(DIST_DIR)/python3-ab-flasher_*_all.deb
#   make lintian      lintian on the release package (fails on errors, lists warnings)
#   make changelog    add a debian/changelog entry for the version in abflasher/__init__.py
#   make clean        remove what the targets above made
#
# Both builds work on a copy of the tree (the files git knows about, committed or not), so the checkout stays clean
# and nothing left over from development (a .venv, build/, *.egg-info) gets into a package. The version has one
# home, abflasher/__init__.py: setup.cfg reads it, and `make deb` refuses to build when debian/changelog disagrees.
#
# Build dependencies (Debian 12): debhelper dh-python python3-all python3-setuptools dpkg-dev fakeroot lintian
# python3-stdeb (scripts/setup-dev installs them).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

BUILD_DIR ?= build/deb
DIST_DIR ?= dist

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' abflasher/__init__.py)
DEB_VERSION := $(shell dpkg-parsechangelog -S Version 2>/dev/null)
DEB_UPSTREAM_VERSION := $(patsubst %-$(lastword $(subst -, ,$(DEB_VERSION))),%,$(DEB_VERSION))

# The builds run with Debian's python3 and tools only: a virtualenv, pyenv shims or PYTHONPATH of the caller must
# not leak into the package (stdeb in particular runs whatever `python3` is first on PATH).
CLEAN_ENV := env -u PYTHONPATH -u VIRTUAL_ENV -u PYTHONHOME PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

# Copy the tree into $(1): the files git knows about (tracked and new, not ignored, not deleted); a tree that is not
# a git checkout (an unpacked tarball) is copied without its build products.
define copy_tree
	rm -rf $(1)
	mkdir -p $(1)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --cached --others --exclude-standard \
			| while IFS= read -r -d '' file; do if [ -e "$$file" ]; then printf '%s\0' "$$file"; fi; done \
			| tar --null -T - -cf - | tar -xf - -C $(1); \
	else \
		tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./deb_dist --exclude='*.egg-info' \
			--exclude='__pycache__' -cf - . | tar -xf - -C $(1); \
	fi
endef

.PHONY: deb deb-stdeb lintian changelog check-version clean

check-version:
	@if [ -z "$(VERSION)" ]; then echo "cannot read __version__ from abflasher/__init__.py" >&2; exit 1; fi
	@if [ "$(DEB_UPSTREAM_VERSION)" != "$(VERSION)" ]; then \
		echo "debian/changelog is at $(DEB_VERSION) but abflasher/__init__.py says $(VERSION):" \
			"run 'make changelog' and describe the release in debian/changelog" >&2; \
		exit 1; \
	fi

deb: check-version
	$(call copy_tree,$(BUILD_DIR)/ab-flasher-$(VERSION))
	cd $(BUILD_DIR)/ab-flasher-$(VERSION) && $(CLEAN_ENV) dpkg-buildpackage --build=binary --no-sign
	mkdir -p $(DIST_DIR)
	cp $(BUILD_DIR)/ab-flasher_$(DEB_VERSION)_all.deb $(BUILD_DIR)/ab-flasher_$(DEB_VERSION)_*.changes \
		$(BUILD_DIR)/ab-flasher_$(DEB_VERSION)_*.buildinfo $(DIST_DIR)/
	@echo "built $(DIST_DIR)/ab-flasher_$(DEB_VERSION)_all.deb"

lintian:
	$(CLEAN_ENV) lintian --fail-on error --display-level '>=warning' --tag-display-limit 0 \
		$(DIST_DIR)/ab-flasher_$(DEB_VERSION)_all.deb

deb-stdeb: check-version
	$(call copy_tree,$(BUILD_DIR)/stdeb-$(VERSION))
	cd $(BUILD_DIR)/stdeb-$(VERSION) && \
		$(CLEAN_ENV) python3 setup.py --command-packages=stdeb.command bdist_deb
	mkdir -p $(DIST_DIR)
	cp $(BUILD_DIR)/stdeb-$(VERSION)/deb_dist/python3-ab-flasher_*_all.deb $(DIST_DIR)/
	@echo "built $$(ls $(DIST_DIR)/python3-ab-flasher_*_all.deb)"

changelog:
	@if [ "$(DEB_UPSTREAM_VERSION)" = "$(VERSION)" ]; then echo "debian/changelog is already at $(DEB_VERSION)"; \
	else \
		{ printf 'ab-flasher (%s-1) bookworm; urgency=medium\n\n  * New release %s.\n\n -- %s  %s\n\n' \
			"$(VERSION)" "$(VERSION)" "$$(dpkg-parsechangelog -S Maintainer)" "$$(date -R)"; \
		  cat debian/changelog; } > debian/changelog.new && mv debian/changelog.new debian/changelog; \
		echo "debian/changelog: added $(VERSION)-1; describe the changes in it"; \
	fi

clean:
	rm -rf build/deb deb_dist ab_flasher.egg-info ab-flasher.egg-info
	rm -f $(DIST_DIR)/ab-flasher_*_all.deb $(DIST_DIR)/ab-flasher_*.changes $(DIST_DIR)/ab-flasher_*.buildinfo \
		$(DIST_DIR)/python3-ab-flasher_*_all.deb
	-rmdir $(DIST_DIR) build 2>/dev/null
