//! Safe handling of the users' `.tar` artifacts and building of Ray working-dir packages.
//!
//! Everything goes through one reader ([`plan`]) that parses the whole archive from memory,
//! checks every entry against [`ArtifactLimits`] and the path rules below, and produces a
//! *plan*: the directories and files that the archive describes, with file contents borrowed
//! from the input bytes (no copy). [`validate_tar`], [`tar_to_zip`] and [`extract_tar`] all use
//! the same plan, so what is accepted at upload is exactly what is later zipped or unpacked.
//!
//! Rules:
//! - paths are relative: absolute paths and any `..` component are rejected; `.` components,
//!   repeated and trailing slashes are dropped, so Python's `tar.add(dir, arcname=".")`
//!   (`.`, `./main.py`) and `tar.add(path, arcname=name)` (`main.py`) give the same files;
//! - GNU long names and PAX `path`/`linkpath`/`size` records are honoured; PAX global headers
//!   (e.g. the commit id that `git archive` writes) are ignored;
//! - regular files and directories are kept; hard links, devices, FIFOs and sparse files are
//!   rejected; a path may not appear twice (except a directory) nor lie under a file or a link;
//! - a symbolic link is rejected if its target is absolute or, resolved inside the archive
//!   (following the archive's own links, as the kernel would), leaves the archive's root.
//!   **Safe links to regular files are materialised as copies of the target; links to
//!   directories, dangling links and link cycles are dropped.** Why: Ray unpacks the working
//!   dir with Python's `zipfile`, which does not recreate symlinks (it writes the link's target
//!   text as a regular file), so a zip symlink would silently break the user's code; a copy
//!   behaves like the link did for reading. Directory links are not copied because a copy can
//!   multiply the size (a link to `.` is a cycle). Nothing is ever created as a symlink on
//!   disk by [`extract_tar`] either, so an extraction cannot be redirected outside `dest`.
//! - limits: the archive itself and every file (after materialisation) are at most
//!   `max_bytes`; at most `max_entries` entries; the files together (copies of links included)
//!   at most `max_unpacked_bytes`; and the zip made by [`tar_to_zip`] at most `max_bytes` (Ray
//!   refuses bigger packages).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Cursor, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

const MIB: u64 = 1024 * 1024;
/// Longest accepted path (Linux `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component (Linux `NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;
/// Most symbolic links followed while resolving one link (Linux uses 40 as well).
const MAX_LINK_HOPS: usize = 40;

/// Caps applied to an artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArtifactLimits {
    /// Largest archive, largest single file and largest zip package, in bytes.
    pub max_bytes: u64,
    /// Most entries (files, directories, links) in the archive.
    pub max_entries: usize,
    /// Largest total size of the unpacked files, in bytes.
    pub max_unpacked_bytes: u64,
}

impl Default for ArtifactLimits {
    /// 100 MiB (Ray's package limit), 10 000 entries, 500 MiB unpacked.
    fn default() -> Self {
        Self {
            max_bytes: 100 * MIB,
            max_entries: 10_000,
            max_unpacked_bytes: 500 * MIB,
        }
    }
}

/// Why an artifact was refused. The messages are meant for the user (HTTP 413 for
/// [`ArtifactError::TooLarge`], 400 for [`ArtifactError::Invalid`]).
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A size or count limit was exceeded.
    #[error("artifact too large: {what} (limit: {limit})")]
    TooLarge {
        /// What is too large, e.g. "the archive is 120.0 MiB".
        what: String,
        /// The limit, human readable, e.g. "100 MiB".
        limit: String,
    },
    /// The archive is not a tar archive or holds something unsafe or unsupported.
    #[error("invalid artifact: {0}")]
    Invalid(String),
    /// Writing the unpacked files failed ([`extract_tar`] only; a server-side fault, not the
    /// user's).
    #[error("could not unpack the artifact to {path}: {source}")]
    Io {
        /// The file or directory being written.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`validate_tar`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarSummary {
    /// Normalised relative paths (`dir/file.py`, no leading `./`) of the regular files, sorted.
    /// Materialised symbolic links are not listed.
    pub files: Vec<String>,
    /// Total size of the files once unpacked (copies of linked files included).
    pub unpacked_bytes: u64,
}

/// Checks a tar archive (see the module documentation for the rules) and lists its files.
pub fn validate_tar(bytes: &[u8], limits: &ArtifactLimits) -> Result<TarSummary, ArtifactError> {
    let plan = plan(bytes, limits)?;
    Ok(TarSummary {
        files: plan
            .files
            .iter()
            .filter(|(_, f)| !f.from_link)
            .map(|(p, _)| p.clone())
            .collect(),
        unpacked_bytes: plan.unpacked_bytes,
    })
}

/// Converts a tar archive into a zip for Ray's `working_dir`: the files sit at the zip's root,
/// every directory has an entry, entries are sorted by path, timestamps are fixed
/// (1980-01-01) and permissions are 0755 for directories and executable files, 0644 for the
/// others, so the same tar always gives the same zip bytes (and so the same package name).
pub fn tar_to_zip(bytes: &[u8], limits: &ArtifactLimits) -> Result<Vec<u8>, ArtifactError> {
    let plan = plan(bytes, limits)?;

    // Directory and file names are disjoint (checked in `plan`): one sorted sequence.
    let mut items: BTreeMap<&str, Option<&PlannedFile<'_>>> = BTreeMap::new();
    items.extend(plan.dirs.iter().map(|d| (d.as_str(), None)));
    items.extend(plan.files.iter().map(|(p, f)| (p.as_str(), Some(f))));

    let base = SimpleFileOptions::default()
        .system(zip::System::Unix)
        .last_modified_time(zip::DateTime::default())
        .compression_method(zip::CompressionMethod::Deflated);
    let capacity = usize::try_from(plan.unpacked_bytes.min(bytes.len() as u64)).unwrap_or(0);
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::with_capacity(capacity)));
    for (name, item) in items {
        match item {
            None => writer
                .add_directory(format!("{name}/"), base.unix_permissions(0o755))
                .map_err(zip_error)?,
            Some(file) => {
                let mode = if file.executable { 0o755 } else { 0o644 };
                writer
                    .start_file(name, base.unix_permissions(mode))
                    .map_err(zip_error)?;
                writer
                    .write_all(file.data)
                    .map_err(|e| zip_error(e.into()))?;
            }
        }
    }
    let zip = writer.finish().map_err(zip_error)?.into_inner();
    if zip.len() as u64 > limits.max_bytes {
        return Err(too_large(
            format!(
                "the packaged working directory is {}",
                human(zip.len() as u64)
            ),
            limits.max_bytes,
        ));
    }
    Ok(zip)
}

/// Unpacks a tar archive into `dest`, which must be an existing, empty directory. The archive
/// is fully checked before anything is written. Files are created with `create_new` (an
/// existing path is never overwritten or followed), with mode 0755 or 0644; no symbolic link is
/// created (safe links to files become copies, see the module documentation).
pub fn extract_tar(
    bytes: &[u8],
    dest: &Path,
    limits: &ArtifactLimits,
) -> Result<(), ArtifactError> {
    let plan = plan(bytes, limits)?;
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ArtifactError::Io { path, source }
    };
    let mut listing = std::fs::read_dir(dest).map_err(io_err(dest))?;
    if listing.next().is_some() {
        return Err(ArtifactError::Io {
            path: dest.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the destination directory is not empty",
            ),
        });
    }
    // Sorted, so every parent comes before its children.
    for dir in &plan.dirs {
        let path = dest.join(dir);
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
        builder.create(&path).map_err(io_err(&path))?;
    }
    for (name, file) in &plan.files {
        let path = dest.join(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(
            &mut options,
            if file.executable { 0o755 } else { 0o644 },
        );
        let mut out = options.open(&path).map_err(io_err(&path))?;
        out.write_all(file.data).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The name under which a zip is stored in Ray's GCS: `_ray_pkg_<32 hex chars of its
/// SHA-256>.zip`. Content-addressed, so an identical package is uploaded once.
pub fn ray_package_name(zip: &[u8]) -> String {
    let hash = sha256_hex(zip);
    format!("_ray_pkg_{}.zip", &hash[..32])
}

// ---------------------------------------------------------------------------------------------
// The plan: one checked reading of the archive.

/// One file to write, its content borrowed from the archive bytes.
#[derive(Debug)]
struct PlannedFile<'a> {
    data: &'a [u8],
    executable: bool,
    /// A materialised symbolic link rather than a regular file of the archive.
    from_link: bool,
}

#[derive(Debug)]
struct Plan<'a> {
    /// Every directory, explicit or implied by a deeper path; never the root.
    dirs: BTreeSet<String>,
    files: BTreeMap<String, PlannedFile<'a>>,
    unpacked_bytes: u64,
}

/// An archive entry after checks.
enum Node<'a> {
    Dir,
    File { data: &'a [u8], executable: bool },
    Symlink { target: String },
}

fn plan<'a>(bytes: &'a [u8], limits: &ArtifactLimits) -> Result<Plan<'a>, ArtifactError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(too_large(
            format!("the archive is {}", human(bytes.len() as u64)),
            limits.max_bytes,
        ));
    }
    if bytes.is_empty() {
        return Err(invalid("the archive is empty"));
    }

    let mut archive = tar::Archive::new(bytes);
    let entries = archive.entries().map_err(not_a_tar)?;
    let mut nodes: BTreeMap<String, Node<'a>> = BTreeMap::new();
    let mut count = 0usize;
    let mut unpacked = 0u64;
    for entry in entries {
        let entry = entry.map_err(not_a_tar)?;
        count += 1;
        if count > limits.max_entries {
            return Err(ArtifactError::TooLarge {
                what: format!("the archive has more than {} entries", limits.max_entries),
                limit: format!("{} entries", limits.max_entries),
            });
        }
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue; // archive-wide metadata only (e.g. `git archive`'s commit id)
        }
        let raw_path = entry.path_bytes();
        let path = normalise(&raw_path)?;
        let shown = || String::from_utf8_lossy(&raw_path).into_owned();
        // Old (v7) archives mark directories with a trailing slash on a regular entry.
        let old_style_dir = kind.is_file() && raw_path.ends_with(b"/") && entry.size() == 0;

        let node = if kind.is_dir() || old_style_dir {
            if path.is_empty() {
                continue; // the root itself (`.` or `./`)
            }
            Node::Dir
        } else if kind.is_file() || kind.is_contiguous() {
            if path.is_empty() {
                return Err(invalid(format!("file entry `{}` has no name", shown())));
            }
            let size = entry.size();
            if size > limits.max_bytes {
                return Err(too_large(
                    format!("file `{path}` is {}", human(size)),
                    limits.max_bytes,
                ));
            }
            unpacked = add_unpacked(unpacked, size, limits)?;
            let start = entry.raw_file_position();
            let data = usize::try_from(start)
                .ok()
                .zip(usize::try_from(size).ok())
                .and_then(|(s, n)| bytes.get(s..s.checked_add(n)?))
                .ok_or_else(|| invalid("the archive is truncated"))?;
            let mode = entry.header().mode().map_err(not_a_tar)?;
            Node::File {
                data,
                executable: mode & 0o111 != 0,
            }
        } else if kind.is_symlink() {
            if path.is_empty() {
                return Err(invalid(format!("symbolic link `{}` has no name", shown())));
            }
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| invalid(format!("symbolic link `{path}` has no target")))?;
            let target = std::str::from_utf8(&target)
                .map_err(|_| invalid(format!("symbolic link `{path}` has a non-UTF-8 target")))?
                .to_owned();
            if target.is_empty() {
                return Err(invalid(format!("symbolic link `{path}` has no target")));
            }
            if target.starts_with('/') {
                return Err(invalid(format!(
                    "symbolic link `{path}` has an absolute target (`{target}`)"
                )));
            }
            if target.len() > MAX_PATH_BYTES {
                return Err(invalid(format!(
                    "symbolic link `{path}` has a too long target"
                )));
            }
            Node::Symlink { target }
        } else if kind.is_hard_link() {
            return Err(invalid(format!(
                "hard links are not supported (`{path}`); add the file itself"
            )));
        } else if kind.is_character_special() || kind.is_block_special() {
            return Err(invalid(format!("device files are not allowed (`{path}`)")));
        } else if kind.is_fifo() {
            return Err(invalid(format!("FIFOs are not allowed (`{path}`)")));
        } else if kind.is_gnu_sparse() {
            return Err(invalid(format!(
                "sparse files are not supported (`{path}`)"
            )));
        } else {
            return Err(invalid(format!(
                "entry `{path}` has an unsupported type (`{}`)",
                char::from(kind.as_byte()).escape_default()
            )));
        };

        match nodes.entry(path) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(node);
            }
            std::collections::btree_map::Entry::Occupied(slot) => {
                if !(matches!(slot.get(), Node::Dir) && matches!(node, Node::Dir)) {
                    return Err(invalid(format!(
                        "the archive contains `{}` more than once",
                        slot.key()
                    )));
                }
            }
        }
    }

    // Directories implied by deeper paths; nothing may lie under a file or a link.
    let mut dirs = BTreeSet::new();
    for (path, node) in &nodes {
        if matches!(node, Node::Dir) {
            dirs.insert(path.clone());
        }
        let mut ancestor = path.as_str();
        while let Some(cut) = ancestor.rfind('/') {
            ancestor = &path[..cut];
            match nodes.get(ancestor) {
                Some(Node::Dir) => {}
                Some(_) => {
                    return Err(invalid(format!(
                        "`{path}` lies under `{ancestor}`, which is not a directory"
                    )));
                }
                None => {
                    dirs.insert(ancestor.to_owned());
                }
            }
        }
    }

    let mut files = BTreeMap::new();
    for (path, node) in &nodes {
        if let Node::File { data, executable } = node {
            let file = PlannedFile {
                data,
                executable: *executable,
                from_link: false,
            };
            files.insert(path.clone(), file);
        }
    }
    for (path, node) in &nodes {
        let Node::Symlink { target } = node else {
            continue;
        };
        let resolved = match resolve(&nodes, path, target) {
            Ok(resolved) => resolved,
            Err(Unresolved::Escapes) => {
                return Err(invalid(format!(
                    "symbolic link `{path}` points outside the archive (`{target}`)"
                )));
            }
            Err(Unresolved::Cycle) => continue,
        };
        if let Some(Node::File { data, executable }) = nodes.get(&resolved) {
            unpacked = add_unpacked(unpacked, data.len() as u64, limits)?;
            let file = PlannedFile {
                data,
                executable: *executable,
                from_link: true,
            };
            files.insert(path.clone(), file);
        }
    }

    if files.is_empty() {
        return Err(invalid("the archive contains no files"));
    }
    Ok(Plan {
        dirs,
        files,
        unpacked_bytes: unpacked,
    })
}

enum Unresolved {
    Escapes,
    Cycle,
}

/// Resolves the target of the link at `link_path` inside the archive, following the archive's
/// links like the kernel would. Returns the normalised path it designates (`""` = root), which
/// may not exist.
fn resolve(
    nodes: &BTreeMap<String, Node<'_>>,
    link_path: &str,
    target: &str,
) -> Result<String, Unresolved> {
    let mut current: Vec<&str> = link_path.split('/').collect();
    current.pop(); // the link's own name: its target is relative to its directory
    let mut pending: VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(component) = pending.pop_front() {
        match component {
            "" | "." => {}
            ".." => {
                if current.pop().is_none() {
                    return Err(Unresolved::Escapes);
                }
            }
            name => {
                current.push(name);
                if let Some(Node::Symlink { target }) = nodes.get(&current.join("/")) {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(Unresolved::Cycle);
                    }
                    if target.starts_with('/') {
                        return Err(Unresolved::Escapes); // refused earlier anyway
                    }
                    current.pop();
                    for part in target.split('/').rev() {
                        pending.push_front(part);
                    }
                }
            }
        }
    }
    Ok(current.join("/"))
}

/// Normalises an entry path to `a/b/c` (no leading `./`, no empty or `.` components);
/// `""` is the archive's root.
fn normalise(raw: &[u8]) -> Result<String, ArtifactError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    let path = std::str::from_utf8(raw)
        .map_err(|_| invalid(format!("path `{}` is not valid UTF-8", shown())))?;
    if path.starts_with('/') {
        return Err(invalid(format!(
            "absolute paths are not allowed (`{path}`)"
        )));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "path `{}…` is too long",
            &path[..path.floor_char_boundary(64)]
        )));
    }
    if path.contains('\\') {
        return Err(invalid(format!(
            "file names with a backslash are not supported (`{path}`)"
        )));
    }
    if path.contains('\0') {
        return Err(invalid(format!(
            "path `{}` contains a NUL byte",
            path.escape_default()
        )));
    }
    let mut parts = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                return Err(invalid(format!(
                    "paths with `..` are not allowed (`{path}`)"
                )));
            }
            name if name.len() > MAX_NAME_BYTES => {
                return Err(invalid(format!("a name in `{path}` is too long")));
            }
            name => parts.push(name),
        }
    }
    Ok(parts.join("/"))
}

fn add_unpacked(total: u64, size: u64, limits: &ArtifactLimits) -> Result<u64, ArtifactError> {
    match total.checked_add(size) {
        Some(sum) if sum <= limits.max_unpacked_bytes => Ok(sum),
        _ => Err(too_large(
            format!(
                "the unpacked files exceed {}",
                human(limits.max_unpacked_bytes)
            ),
            limits.max_unpacked_bytes,
        )),
    }
}

fn invalid(message: impl Into<String>) -> ArtifactError {
    ArtifactError::Invalid(message.into())
}

fn not_a_tar(error: std::io::Error) -> ArtifactError {
    invalid(format!("not a readable tar archive ({error})"))
}

fn too_large(what: String, limit: u64) -> ArtifactError {
    ArtifactError::TooLarge {
        what,
        limit: human(limit),
    }
}

fn zip_error(error: zip::result::ZipError) -> ArtifactError {
    ArtifactError::Io {
        path: "<zip package>".to_owned(),
        source: std::io::Error::other(error),
    }
}

/// `123 bytes`, `1.5 KiB`, `100 MiB`, `2.3 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A tar built entry by entry, with raw names so that hostile paths can be written too
    /// (the `tar` crate's own path setters refuse `..` and absolute paths).
    struct TarBuilder(tar::Builder<Vec<u8>>);

    impl TarBuilder {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, name: &str, size: u64, mode: u32) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(size);
            header.set_mode(mode);
            header.set_mtime(1_700_000_000);
            let raw = &mut header.as_old_mut().name;
            assert!(name.len() < raw.len(), "use long() for long names");
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            header
        }

        fn file(mut self, name: &str, data: &[u8]) -> Self {
            self.file_mode(name, data, 0o644);
            self
        }

        fn file_mode(&mut self, name: &str, data: &[u8], mode: u32) {
            let header = Self::header(tar::EntryType::Regular, name, data.len() as u64, mode);
            self.0.append(&header, data).unwrap();
        }

        fn exec(mut self, name: &str, data: &[u8]) -> Self {
            self.file_mode(name, data, 0o755);
            self
        }

        fn dir(mut self, name: &str) -> Self {
            let header = Self::header(tar::EntryType::Directory, name, 0, 0o755);
            self.0.append(&header, std::io::empty()).unwrap();
            self
        }

        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut header = Self::header(kind, name, 0, 0o777);
            let raw = &mut header.as_old_mut().linkname;
            raw.fill(0);
            raw[..target.len()].copy_from_slice(target.as_bytes());
            header.set_cksum();
            self.0.append(&header, std::io::empty()).unwrap();
            self
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, name, target)
        }

        fn special(mut self, kind: tar::EntryType, name: &str) -> Self {
            let header = Self::header(kind, name, 0, 0o644);
            self.0.append(&header, std::io::empty()).unwrap();
            self
        }

        /// A long name through the tar crate (GNU `L` record).
        fn long_gnu(mut self, name: &str, data: &[u8]) -> Self {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            self.0.append_data(&mut header, name, data).unwrap();
            self
        }

        /// A long name through a PAX `x` record, as Python's `tarfile` writes it.
        fn long_pax(mut self, name: &str, data: &[u8]) -> Self {
            let pax = pax_record("path", name);
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::XHeader);
            header.set_path("././@PaxHeader").unwrap();
            header.set_size(pax.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            self.0.append(&header, pax.as_bytes()).unwrap();
            let mut header = tar::Header::new_ustar();
            header.set_path(&name[..90]).unwrap(); // truncated, as Python does
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
    fn pax_record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    }

    fn limits() -> ArtifactLimits {
        ArtifactLimits::default()
    }

    fn invalid_message(bytes: &[u8]) -> String {
        match validate_tar(bytes, &limits()) {
            Err(ArtifactError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn read_zip(zip: &[u8]) -> Vec<(String, Option<Vec<u8>>, u32)> {
        let mut archive = zip::ZipArchive::new(Cursor::new(zip)).unwrap();
        (0..archive.len())
            .map(|i| {
                let mut file = archive.by_index(i).unwrap();
                let name = file.name().unwrap().into_owned();
                let mode = file.unix_mode().unwrap();
                if file.is_dir() {
                    (name, None, mode)
                } else {
                    let mut data = Vec::new();
                    file.read_to_end(&mut data).unwrap();
                    (name, Some(data), mode)
                }
            })
            .collect()
    }

    #[test]
    fn accepts_a_plain_archive() {
        let tar = TarBuilder::new()
            .file("main.py", b"print('hi')\n")
            .dir("pkg/")
            .file("pkg/mod.py", b"X = 1\n")
            .finish();
        let summary = validate_tar(&tar, &limits()).unwrap();
        assert_eq!(summary.files, ["main.py", "pkg/mod.py"]);
        assert_eq!(summary.unpacked_bytes, 12 + 6);
    }

    #[test]
    fn accepts_python_style_dot_prefixed_archive() {
        // tarfile's `tar.add(dir, arcname=".")`
        let tar = TarBuilder::new()
            .dir(".")
            .file("./main.py", b"print('hi')\n")
            .dir("./sub")
            .file("./sub//data.txt", b"abc")
            .dir("./")
            .finish();
        let summary = validate_tar(&tar, &limits()).unwrap();
        assert_eq!(summary.files, ["main.py", "sub/data.txt"]);
        let zip = tar_to_zip(&tar, &limits()).unwrap();
        let names: Vec<_> = read_zip(&zip).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["main.py", "sub/", "sub/data.txt"]);
    }

    #[test]
    fn accepts_gnu_and_pax_long_names() {
        let long_dir = "d".repeat(120);
        let gnu = format!("{long_dir}/gnu_{}.py", "g".repeat(100));
        let pax = format!("{long_dir}/pax_{}.py", "p".repeat(100));
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .long_gnu(&gnu, b"gnu data")
            .long_pax(&pax, b"pax data")
            .finish();
        let summary = validate_tar(&tar, &limits()).unwrap();
        assert_eq!(
            summary.files,
            [gnu.clone(), pax.clone(), "main.py".to_owned()]
        );
        let entries = read_zip(&tar_to_zip(&tar, &limits()).unwrap());
        let get = |name: &str| {
            entries
                .iter()
                .find(|(n, _, _)| n == name)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(get(&gnu).unwrap(), b"gnu data");
        assert_eq!(get(&pax).unwrap(), b"pax data");
        assert_eq!(get(&format!("{long_dir}/")), None);
    }

    #[test]
    fn ignores_pax_global_headers() {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XGlobalHeader);
        header.set_path("pax_global_header").unwrap();
        let body = b"52 comment=0123456789012345678901234567890123456789\n";
        header.set_size(body.len() as u64);
        header.set_cksum();
        let mut builder = TarBuilder::new();
        builder.0.append(&header, &body[..]).unwrap();
        let tar = builder.file("main.py", b"1").finish();
        assert_eq!(validate_tar(&tar, &limits()).unwrap().files, ["main.py"]);
    }

    #[test]
    fn rejects_traversal() {
        for name in ["../x", "a/../../x", "./../x", "a/.."] {
            let tar = TarBuilder::new()
                .file("main.py", b"1")
                .file(name, b"x")
                .finish();
            let message = invalid_message(&tar);
            assert!(message.contains("`..`"), "{name}: {message}");
        }
        let tar = TarBuilder::new()
            .dir("../up")
            .file("main.py", b"1")
            .finish();
        assert!(invalid_message(&tar).contains("`..`"));
    }

    #[test]
    fn rejects_absolute_paths() {
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .file("/etc/x", b"x")
            .finish();
        let message = invalid_message(&tar);
        assert!(message.contains("absolute"), "{message}");
    }

    #[test]
    fn rejects_escaping_and_absolute_symlinks() {
        let cases = [
            ("up", "../outside"),
            ("deep", "a/../../outside"),
            ("sub/up", "../../x"),
            ("abs", "/etc/passwd"),
        ];
        for (name, target) in cases {
            let tar = TarBuilder::new()
                .file("main.py", b"1")
                .symlink(name, target)
                .finish();
            let message = invalid_message(&tar);
            assert!(
                message.contains("outside") || message.contains("absolute"),
                "{name} -> {target}: {message}"
            );
        }
    }

    #[test]
    fn rejects_escapes_through_other_links() {
        // `here` is the root; `here/..` is then above the root although it looks harmless.
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .symlink("here", ".")
            .symlink("trick", "here/../etc/passwd")
            .finish();
        assert!(invalid_message(&tar).contains("outside"));
        // `d/up` is the root (safe on its own); `d/up/..` looks like `d` but is above the root.
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .dir("d")
            .symlink("d/up", "..")
            .symlink("esc", "d/up/..")
            .finish();
        assert!(invalid_message(&tar).contains("`esc` points outside"));
        // The same links without the escaping one are fine.
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .dir("d")
            .symlink("d/up", "..")
            .symlink("ok", "d/up/main.py")
            .finish();
        assert!(validate_tar(&tar, &limits()).is_ok());
    }

    #[test]
    fn rejects_paths_under_links_and_files() {
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .symlink("lib", "src")
            .dir("src")
            .file("lib/x.py", b"x")
            .finish();
        assert!(invalid_message(&tar).contains("not a directory"));
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .file("main.py/x", b"x")
            .finish();
        assert!(invalid_message(&tar).contains("not a directory"));
    }

    #[test]
    fn rejects_duplicates_but_not_repeated_directories() {
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .file("./main.py", b"2")
            .finish();
        assert!(invalid_message(&tar).contains("more than once"));
        let tar = TarBuilder::new()
            .dir("a")
            .dir("./a/")
            .file("a/main.py", b"1")
            .finish();
        assert!(validate_tar(&tar, &limits()).is_ok());
    }

    #[test]
    fn rejects_hard_links_devices_and_fifos() {
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .link(tar::EntryType::Link, "copy.py", "main.py")
            .finish();
        assert!(invalid_message(&tar).contains("hard link"));
        for (kind, word) in [
            (tar::EntryType::Char, "device"),
            (tar::EntryType::Block, "device"),
            (tar::EntryType::Fifo, "FIFO"),
        ] {
            let tar = TarBuilder::new()
                .file("main.py", b"1")
                .special(kind, "dev")
                .finish();
            let message = invalid_message(&tar);
            assert!(message.contains(word), "{message}");
        }
    }

    #[test]
    fn rejects_garbage_empty_and_truncated_input() {
        assert!(invalid_message(b"").contains("empty"));
        assert!(invalid_message(&[7u8; 1024]).contains("not a readable tar"));
        let tar = TarBuilder::new().file("main.py", &[b'x'; 2000]).finish();
        assert!(invalid_message(&tar[..1200]).contains("truncated"));
        let only_dirs = TarBuilder::new().dir(".").dir("a").finish();
        assert!(invalid_message(&only_dirs).contains("no files"));
    }

    #[test]
    fn enforces_entry_and_size_limits() {
        let mut builder = TarBuilder::new();
        for i in 0..11 {
            builder = builder.file(&format!("f{i}.py"), b"x");
        }
        let tar = builder.finish();
        let few = ArtifactLimits {
            max_entries: 10,
            ..limits()
        };
        assert!(matches!(
            validate_tar(&tar, &few),
            Err(ArtifactError::TooLarge { .. })
        ));
        let enough = ArtifactLimits {
            max_entries: 11,
            ..limits()
        };
        assert!(validate_tar(&tar, &enough).is_ok());

        // The archive itself larger than max_bytes.
        let tar = TarBuilder::new().file("main.py", &[b'x'; 5000]).finish();
        let small = ArtifactLimits {
            max_bytes: 4096,
            ..limits()
        };
        let error = validate_tar(&tar, &small).unwrap_err();
        assert!(matches!(error, ArtifactError::TooLarge { .. }));
        assert!(
            error.to_string().contains("the archive is 6.5 KiB"),
            "{error}"
        );

        // Unpacked total.
        let tar = TarBuilder::new()
            .file("a.py", &[b'x'; 3000])
            .file("b.py", &[b'x'; 3000])
            .finish();
        let unpacked = ArtifactLimits {
            max_unpacked_bytes: 5000,
            ..limits()
        };
        let error = validate_tar(&tar, &unpacked).unwrap_err();
        assert!(error.to_string().contains("unpacked"), "{error}");
    }

    #[test]
    fn a_file_larger_than_max_bytes_is_too_large() {
        // A PAX `size` record claims a 200 MiB file in a tiny archive: refused on the size,
        // before any data is looked at.
        let mut builder = TarBuilder::new();
        let pax = pax_record("size", &(200 * MIB).to_string());
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_path("././@PaxHeader").unwrap();
        header.set_size(pax.len() as u64);
        header.set_cksum();
        builder.0.append(&header, pax.as_bytes()).unwrap();
        let tar = builder.file("main.py", b"1").finish();
        let error = validate_tar(&tar, &limits()).unwrap_err();
        assert!(matches!(error, ArtifactError::TooLarge { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "artifact too large: file `main.py` is 200 MiB (limit: 100 MiB)"
        );
    }

    #[test]
    fn too_large_messages_are_readable() {
        let error = too_large(format!("the archive is {}", human(150 * MIB)), 100 * MIB);
        assert_eq!(
            error.to_string(),
            "artifact too large: the archive is 150 MiB (limit: 100 MiB)"
        );
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 bytes");
    }

    #[test]
    fn zip_round_trip_keeps_content_modes_and_layout() {
        let tar = TarBuilder::new()
            .dir("./")
            .exec("./run.sh", b"#!/bin/sh\necho hi\n")
            .file("./main.py", b"print('hi')\n")
            .dir("./empty")
            .file("./a/b/c.txt", b"deep")
            .finish();
        let zip = tar_to_zip(&tar, &limits()).unwrap();
        let entries = read_zip(&zip);
        let expected: Vec<(String, Option<Vec<u8>>, u32)> = vec![
            ("a/".into(), None, 0o040755),
            ("a/b/".into(), None, 0o040755),
            ("a/b/c.txt".into(), Some(b"deep".to_vec()), 0o100644),
            ("empty/".into(), None, 0o040755),
            ("main.py".into(), Some(b"print('hi')\n".to_vec()), 0o100644),
            (
                "run.sh".into(),
                Some(b"#!/bin/sh\necho hi\n".to_vec()),
                0o100755,
            ),
        ];
        assert_eq!(entries, expected);
    }

    #[test]
    fn zip_is_deterministic() {
        let make = |order: bool| {
            let builder = TarBuilder::new();
            let builder = if order {
                builder.file("b.py", b"b").file("a.py", b"a")
            } else {
                builder.file("./a.py", b"a").file("./b.py", b"b")
            };
            builder.finish()
        };
        let first = tar_to_zip(&make(true), &limits()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100)); // a new DOS-time second
        let second = tar_to_zip(&make(true), &limits()).unwrap();
        let reordered = tar_to_zip(&make(false), &limits()).unwrap();
        assert_eq!(first, second);
        assert_eq!(first, reordered);
        assert_eq!(ray_package_name(&first), ray_package_name(&second));
    }

    #[test]
    fn safe_symlinks_become_copies_and_the_rest_is_dropped() {
        let tar = TarBuilder::new()
            .exec("bin/tool", b"#!tool")
            .file("main.py", b"main")
            .symlink("alias.py", "main.py")
            .symlink("sub/tool", "../bin/tool")
            .dir("sub")
            .symlink("bindir", "bin")
            .symlink("via_dir", "bindir/tool")
            .symlink("dangling", "nope.py")
            .symlink("loop1", "loop2")
            .symlink("loop2", "loop1")
            .symlink("dot", ".")
            .finish();
        let summary = validate_tar(&tar, &limits()).unwrap();
        assert_eq!(summary.files, ["bin/tool", "main.py"]);
        assert_eq!(summary.unpacked_bytes, (6 + 4) + (4 + 6 + 6));
        let entries = read_zip(&tar_to_zip(&tar, &limits()).unwrap());
        let names: Vec<_> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "alias.py", "bin/", "bin/tool", "main.py", "sub/", "sub/tool", "via_dir"
            ]
        );
        let by_name = |name: &str| entries.iter().find(|(n, _, _)| n == name).unwrap();
        assert_eq!(by_name("alias.py").1.as_deref(), Some(&b"main"[..]));
        assert_eq!(by_name("sub/tool").1.as_deref(), Some(&b"#!tool"[..]));
        assert_eq!(by_name("sub/tool").2, 0o100755);
        assert_eq!(by_name("via_dir").1.as_deref(), Some(&b"#!tool"[..]));
    }

    #[test]
    fn materialised_links_count_towards_the_unpacked_limit() {
        let mut builder = TarBuilder::new().file("big.bin", &[0u8; 4000]);
        for i in 0..3 {
            builder = builder.symlink(&format!("copy{i}"), "big.bin");
        }
        let tar = builder.finish();
        let cap = ArtifactLimits {
            max_unpacked_bytes: 10_000,
            ..limits()
        };
        assert!(matches!(
            validate_tar(&tar, &cap),
            Err(ArtifactError::TooLarge { .. })
        ));
    }

    #[test]
    fn extracts_into_an_empty_directory() {
        let tar = TarBuilder::new()
            .dir(".")
            .exec("./run.sh", b"#!/bin/sh\n")
            .file("./pkg/mod.py", b"X = 1\n")
            .symlink("./alias.py", "pkg/mod.py")
            .dir("./empty")
            .finish();
        let dir = tempfile::tempdir().unwrap();
        extract_tar(&tar, dir.path(), &limits()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("pkg/mod.py")).unwrap(),
            b"X = 1\n"
        );
        let alias = dir.path().join("alias.py");
        assert!(!alias.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(alias).unwrap(), b"X = 1\n");
        assert!(dir.path().join("empty").is_dir());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| {
                std::fs::metadata(dir.path().join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            // The process umask may clear group/other bits: check the owner's.
            assert_eq!(mode("run.sh") & 0o700, 0o700);
            assert_eq!(mode("pkg/mod.py") & 0o700, 0o600);
        }
        // A second extraction into the now non-empty directory is refused.
        assert!(matches!(
            extract_tar(&tar, dir.path(), &limits()),
            Err(ArtifactError::Io { .. })
        ));
    }

    #[test]
    fn extraction_refuses_unsafe_archives_before_writing() {
        let tar = TarBuilder::new()
            .file("main.py", b"1")
            .file("../evil", b"x")
            .finish();
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            extract_tar(&tar, dir.path(), &limits()),
            Err(ArtifactError::Invalid(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn package_name_is_content_addressed() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            ray_package_name(b"abc"),
            "_ray_pkg_ba7816bf8f01cfea414140de5dae2223.zip"
        );
    }
}
