/*
 * buildinfo.h - what this build is: the release version (CMake's project
 * version, also LONGRUN_VERSION) and the commit it was built from.
 *
 * Both are generated at build time by common/buildinfo.cmake (the commit
 * from git, or -DLONGRUN_COMMIT=... where the source has no .git, such as
 * the image build; "unknown" when neither says).  They show in --version,
 * /health and the longrun_build_info gauge (docs/metrics.md).  Constant
 * strings: any thread.
 */
#ifndef LR_BUILDINFO_H
#define LR_BUILDINFO_H

extern const char lr_build_version[]; /* "0.1.0" */
extern const char lr_build_commit[];  /* 12 hex digits, "-dirty" when built from a changed tree; or "unknown" */

#endif
