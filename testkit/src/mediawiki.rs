//! A real MediaWiki image: Debian bookworm's `mediawiki` package (1.39) with PHP 8.2 and its
//! PostgreSQL driver, built without Docker and cached on the machine by a hash of its recipe.
//!
//! [`push_mediawiki`] builds the image once per machine (`mmdebstrap` into a tarball, `umoci
//! raw add-layer` of that tarball as one gzip layer, `umoci config`) and keeps the OCI layout
//! in `/var/cache/homeport-test/images/mediawiki-<recipe_hash>/` (`$HOMEPORT_TEST_CACHE`
//! replaces `/var/cache/homeport-test`), outside the repository, so a fresh checkout on the same
//! machine reuses it. A build happens in a temporary directory next to the cache and is renamed
//! into place, so a killed build never leaves half a cache; a lock file makes concurrent
//! callers (parallel tests, parallel test binaries) wait for one build instead of building
//! twice. Later calls only push the cached layout with skopeo.
//!
//! # The image
//!
//! - `Cmd`: `php -S 0.0.0.0:8080 -t /var/lib/mediawiki` (PHP's built-in web server; the image's
//!   `Env` sets `PHP_CLI_SERVER_WORKERS=4` so it serves 4 requests at a time). Exposes
//!   8080/tcp. `User`: `www-data` (uid 33, gid 33). `WorkingDir`: `/var/lib/mediawiki`.
//! - Debian's layout: the code is in `/usr/share/mediawiki` (`$IP`; maintenance scripts in
//!   `/usr/share/mediawiki/maintenance/`), the web root `/var/lib/mediawiki` is symlinks into
//!   it. `$IP/LocalSettings.php` → `/var/lib/mediawiki/LocalSettings.php` →
//!   `/etc/mediawiki/LocalSettings.php`, which in this image is a fixed, read-only file of ours
//!   (see below).
//! - Works on a **read-only root filesystem**: everything MediaWiki writes is on **one volume,
//!   `/var/lib/mediawiki-data`** (owned by www-data), or in `/tmp`:
//!   - `/var/lib/mediawiki-data/LocalSettings.php`: written once by `install.php
//!     --confpath /var/lib/mediawiki-data`;
//!   - `/var/lib/mediawiki-data/images/`: uploads (`$wgUploadDirectory`;
//!     `/var/lib/mediawiki/images` is a symlink to it, so `/images/…` URLs serve them);
//!   - `/var/lib/mediawiki-data/cache/`: `$wgCacheDirectory` (the localisation cache);
//!   - `/tmp`: `$wgTmpDirectory`, PHP's `session.save_path`, `upload_tmp_dir` and
//!     `sys_temp_dir` (a `conf.d/90-homeport.ini` for the cli and cgi SAPIs). MediaWiki keeps
//!     its own sessions in the database (no cache server configured).
//!
//!   `images/` and `cache/` are created on the first request when missing.
//! - `/etc/mediawiki/LocalSettings.php` (ours) stops with "MediaWiki is not installed yet"
//!   (HTTP 503; exit status 1 in maintenance scripts) until the volume has a
//!   `LocalSettings.php`. Afterwards it loads it, then overrides these settings from the
//!   environment (the first variable set and not empty wins; none set: the installed value
//!   stays), so the URL and the database credentials are always the current ones:
//!
//!   | setting | variables |
//!   |---|---|
//!   | `$wgServer` (public URL, `https://…`, no trailing slash) | `MEDIAWIKI_SERVER`, `HOMEPORT_URL` |
//!   | `$wgDBserver` | `MEDIAWIKI_DB_SERVER`, `PGHOST` |
//!   | `$wgDBport` | `MEDIAWIKI_DB_PORT`, `PGPORT` |
//!   | `$wgDBname` | `MEDIAWIKI_DB_NAME`, `PGDATABASE` |
//!   | `$wgDBuser` | `MEDIAWIKI_DB_USER`, `PGUSER` |
//!   | `$wgDBpassword` | `MEDIAWIKI_DB_PASSWORD`, `PGPASSWORD` |
//!
//! # Using it
//!
//! Verified by hand on the built image: its rootfs bind-mounted read-only, a directory owned by
//! uid 33 at `/var/lib/mediawiki-data`, tmpfs at `/tmp` and `/run`, run as uid 33 (`unshare
//! --mount` + `chroot --userspec=33:33`, host network), against a throwaway PostgreSQL 15.
//!
//! A manifest (the `{{…}}` templates are filled in by the agent, in hook commands too):
//!
//! ```toml
//! name = "wiki"
//! image = "127.0.0.1:PORT/mediawiki:1.39"   # what push_mediawiki returns
//!
//! [https]
//! port = 8080
//!
//! [database]
//! variant = "postgres"
//!
//! [[volume]]
//! name = "data"
//! path = "/var/lib/mediawiki-data"
//!
//! [env]
//! MEDIAWIKI_SERVER = "{{https.url}}"   # not needed when the agent sets HOMEPORT_URL
//!
//! [[hook]]
//! when = "install"
//! command = ["env", "MW_CONFIG_FILE=/var/lib/mediawiki-data/LocalSettings.php",
//!   "php", "/usr/share/mediawiki/maintenance/install.php",
//!   "--dbtype", "postgres", "--dbserver", "{{database.host}}", "--dbport", "{{database.port}}",
//!   "--dbname", "{{database.name}}", "--dbuser", "{{database.user}}",
//!   "--dbpass", "{{database.password}}", "--server", "{{https.url}}", "--scriptpath", "",
//!   "--confpath", "/var/lib/mediawiki-data", "--pass", "ADMIN-PASSWORD-10+", "Test Wiki", "admin"]
//! ```
//!
//! - The install hook needs `MW_CONFIG_FILE` pointing at the not-yet-existing file:
//!   `install.php` refuses to run ("upgrade instead") when the settings file it would load
//!   exists, and ours always does. It creates the tables in schema `mediawiki` (the role must
//!   own the database), the user `Admin` and `Main_Page`, writes
//!   `/var/lib/mediawiki-data/LocalSettings.php`, and takes about a second. The password must
//!   have 10 or more characters. A second run fails (tables exist): install once.
//! - Serving is the image's `Cmd` (`php -S 0.0.0.0:8080 -t /var/lib/mediawiki`). `$wgServer`
//!   is written by `--server` at install time and overridden per request by
//!   `MEDIAWIKI_SERVER`/`HOMEPORT_URL`.
//! - `GET /index.php?title=Main_Page` → 200 with `<title>Test Wiki</title>`. `GET /` → 301 to
//!   `$wgServer/index.php/Main_Page` (so only follow redirects through the real proxy).
//! - Creating a page over the web API, logged in as the admin (keep cookies between requests;
//!   both ways below work):
//!   1. `GET /api.php?action=query&meta=tokens&type=login&format=json` →
//!      `.query.tokens.logintoken`;
//!   2. `POST /api.php` (form) `action=clientlogin&username=admin&password=…&logintoken=…&
//!      loginreturnurl=https://…/&format=json` → `{"clientlogin":{"status":"PASS",…}}`; or
//!      `action=login&lgname=admin&lgpassword=…&lgtoken=…&format=json` →
//!      `"login":{"result":"Success"}` with a warning that main-account `action=login` is
//!      deprecated;
//!   3. `GET /api.php?action=query&meta=tokens&format=json` → `.query.tokens.csrftoken`;
//!   4. `POST /api.php` (form) `action=edit&title=Homeport_Test&text=…&token=…&format=json` →
//!      `{"edit":{"result":"Success",…}}`.
//!
//!   Anonymous edits are allowed by MediaWiki's defaults too (steps 1–3 skipped, token `+\`).
//! - Reading it back: `GET /api.php?action=parse&page=Homeport_Test&format=json` →
//!   `.parse.text["*"]` is the HTML (with `&formatversion=2`: `.parse.text`).
//! - Without HTTP, a command in the container: `echo TEXT | php
//!   /usr/share/mediawiki/maintenance/edit.php --user admin PAGE` (loads the settings through
//!   our `LocalSettings.php`, so the environment overrides apply).
//! - Behind the HTTPS proxy, MediaWiki marks its session cookies `Secure` when the request
//!   carries `X-Forwarded-Proto: https`; without it (plain HTTP to port 8080) they are not.
//! - PHP's built-in server does not stop its `PHP_CLI_SERVER_WORKERS` children when only the
//!   parent gets SIGTERM: stopping the container's process tree (cgroup) is needed.
//!
//! Old cache entries (other recipe hashes) are not removed automatically: each is ~110 MB.

use crate::image::{push_layout, PushOpts};
use crate::registry::Registry;
use crate::run;
use anyhow::{ensure, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository name of the pushed image.
pub const NAME: &str = "mediawiki";
/// Tag of the pushed image (and in the cached layout).
pub const TAG: &str = "1.39";
/// The one volume that holds everything MediaWiki writes.
pub const DATA_VOLUME: &str = "/var/lib/mediawiki-data";
/// The port `php -S` serves on.
pub const HTTP_PORT: u16 = 8080;

/// Bump when the build changes in a way the hashed recipe below does not show (e.g. the umoci
/// steps' code).
const RECIPE_VERSION: u32 = 1;

/// Packages on top of the essential set. `php8.2-cgi` and `mini-httpd` satisfy `php`'s and
/// `mediawiki`'s "web server SAPI | web server" dependencies, which apt would otherwise satisfy
/// with apache2 and its module (and perl); neither runs.
const PACKAGES: &[&str] = &[
    "mediawiki",
    "php-cli",
    "php-pgsql",
    "php-intl",
    "php-mbstring",
    "php-xml",
    "ca-certificates",
    "php8.2-cgi",
    "mini-httpd",
];

const SUITE: &str = "bookworm";
/// The machine's own apt sources: passed as mmdebstrap's mirror so no mirror host name is
/// written anywhere by us; hashed into the recipe.
const APT_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
/// Clamps file times in the tarball (mmdebstrap's reproducible mode).
const SOURCE_DATE_EPOCH: &str = "1684540800";
/// Default root of the test cache; `$HOMEPORT_TEST_CACHE` replaces it.
const DEFAULT_CACHE_ROOT: &str = "/var/cache/homeport-test";
const CACHE_ENV: &str = "HOMEPORT_TEST_CACHE";

/// Run on the finished tree by mmdebstrap (`$1` is its root), before it is packed.
const CUSTOMIZE_SH: &str = r#"set -eu
root="$1"
# No mirror host name in the image; no apt state or logs.
rm -f "$root/etc/apt/sources.list.d/0000debian.sources"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/apt "$root"/var/log/*.log
# Reproducible, and the runtime bind-mounts its own resolv.conf over this one.
: >"$root/etc/resolv.conf"
echo mediawiki >"$root/etc/hostname"
# Everything MediaWiki writes lives in one volume.
install -d -o 33 -g 33 -m 0755 "$root/var/lib/mediawiki-data"
rm -rf "$root/var/lib/mediawiki/images" "$root/var/lib/mediawiki/cache"
ln -s /var/lib/mediawiki-data/images "$root/var/lib/mediawiki/images"
ln -s /var/lib/mediawiki-data/cache "$root/var/lib/mediawiki/cache"
cat >"$root/etc/mediawiki/LocalSettings.php" <<'EOF'
<?php
# Homeport image: this file is read-only. install.php writes the wiki's own settings to the
# volume (--confpath /var/lib/mediawiki-data); they are loaded here, then every writable path
# is pointed at the volume or /tmp, and MEDIAWIKI_* environment variables override the URL
# and the database connection.
$homeportData = '/var/lib/mediawiki-data';
if ( !is_file( "$homeportData/LocalSettings.php" ) ) {
	if ( PHP_SAPI !== 'cli' ) {
		http_response_code( 503 );
		header( 'Content-Type: text/plain; charset=utf-8' );
	}
	echo "MediaWiki is not installed yet: $homeportData/LocalSettings.php is missing.\n";
	exit( 1 );
}
require "$homeportData/LocalSettings.php";
$wgUploadDirectory = "$homeportData/images";
$wgCacheDirectory = "$homeportData/cache";
foreach ( [ $wgUploadDirectory, $wgCacheDirectory ] as $homeportDir ) {
	if ( !is_dir( $homeportDir ) ) {
		@mkdir( $homeportDir, 0755, true );
	}
}
$wgTmpDirectory = '/tmp';
# The first variable set and not empty wins; none: the value install.php wrote stays.
foreach ( [
	'wgServer' => [ 'MEDIAWIKI_SERVER', 'HOMEPORT_URL' ],
	'wgDBserver' => [ 'MEDIAWIKI_DB_SERVER', 'PGHOST' ],
	'wgDBport' => [ 'MEDIAWIKI_DB_PORT', 'PGPORT' ],
	'wgDBname' => [ 'MEDIAWIKI_DB_NAME', 'PGDATABASE' ],
	'wgDBuser' => [ 'MEDIAWIKI_DB_USER', 'PGUSER' ],
	'wgDBpassword' => [ 'MEDIAWIKI_DB_PASSWORD', 'PGPASSWORD' ],
] as $homeportVar => $homeportEnvs ) {
	foreach ( $homeportEnvs as $homeportEnv ) {
		$homeportValue = getenv( $homeportEnv );
		if ( is_string( $homeportValue ) && $homeportValue !== '' ) {
			$GLOBALS[$homeportVar] = $homeportValue;
			break;
		}
	}
}
unset( $homeportData, $homeportDir, $homeportVar, $homeportEnvs, $homeportEnv, $homeportValue );
EOF
for sapi in cli cgi; do
  cat >"$root/etc/php/8.2/$sapi/conf.d/90-homeport.ini" <<'EOF'
; Homeport image: the root filesystem is read-only; /tmp is writable.
session.save_path = "/tmp"
upload_tmp_dir = "/tmp"
sys_temp_dir = "/tmp"
EOF
done
# The image runs as www-data: fail the build if Debian ever moves it off 33.
grep -q '^www-data:[^:]*:33:33:' "$root/etc/passwd"
"#;

/// Everything that decides the image's content.
#[derive(Clone, Debug)]
struct Recipe {
    version: u32,
    suite: String,
    packages: Vec<String>,
    customize: String,
}

impl Recipe {
    fn standard() -> Recipe {
        Recipe {
            version: RECIPE_VERSION,
            suite: SUITE.into(),
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
            customize: CUSTOMIZE_SH.into(),
        }
    }

    /// mmdebstrap's arguments, writing `tarball` and running `customize_script` as the
    /// customize hook.
    fn mmdebstrap_args(&self, tarball: &Path, customize_script: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--variant=essential".to_owned(),
            // As root too: its mounts (/proc, /sys, /dev binds) live in a mount namespace of
            // its own and vanish with it, even when the build is killed.
            "--mode=unshare".to_owned(),
            format!("--include={}", self.packages.join(",")),
            // Merged /usr with usr-is-merged instead of the usrmerge package (and its perl).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr".to_owned(),
            r#"--aptopt=Acquire::Check-Valid-Until "false""#.to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        for (what, pattern) in [
            ("exclude", "/usr/share/man/*"),
            ("exclude", "/usr/share/doc/*"),
            ("include", "/usr/share/doc/*/copyright"),
            ("exclude", "/usr/share/info/*"),
            ("exclude", "/usr/share/lintian/*"),
            ("exclude", "/usr/share/locale/*"),
        ] {
            args.push(format!("--dpkgopt=path-{what}={pattern}").into());
        }
        let mut hook = OsString::from("--customize-hook=sh ");
        hook.push(customize_script);
        hook.push(r#" "$1""#);
        args.push(hook);
        args.push(self.suite.clone().into());
        args.push(tarball.into());
        args.push(APT_SOURCES.into());
        args
    }

    /// `umoci config` arguments (after `--image`).
    fn config_args() -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        for part in [
            "php",
            "-S",
            &format!("0.0.0.0:{HTTP_PORT}"),
            "-t",
            "/var/lib/mediawiki",
        ] {
            args.extend(["--config.cmd".into(), part.into()]);
        }
        for env in [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PHP_CLI_SERVER_WORKERS=4",
        ] {
            args.extend(["--config.env".into(), env.into()]);
        }
        args.extend([
            "--config.user".into(),
            "www-data".into(),
            "--config.workingdir".into(),
            "/var/lib/mediawiki".into(),
            "--config.exposedports".into(),
            format!("{HTTP_PORT}/tcp"),
            "--config.volume".into(),
            DATA_VOLUME.into(),
        ]);
        args
    }

    /// Hex SHA-256 over every input of the build: the version, the exact mmdebstrap and umoci
    /// arguments, the customize script and the apt sources' content.
    fn hash(&self, apt_sources: &[u8]) -> String {
        let description = serde_json::json!({
            "version": self.version,
            "source_date_epoch": SOURCE_DATE_EPOCH,
            "mmdebstrap": self
                .mmdebstrap_args(Path::new("OUT/rootfs.tar"), Path::new("OUT/customize.sh"))
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            "customize": self.customize,
            "config": Self::config_args(),
            "tag": TAG,
        });
        let mut hasher = Sha256::new();
        hasher.update(description.to_string().as_bytes());
        hasher.update(b"\0apt-sources\0");
        hasher.update(apt_sources);
        hex::encode(hasher.finalize())
    }
}

/// Hash of the image's recipe (package list, build parameters, apt sources' content): the
/// cached layout is `…/images/mediawiki-<recipe_hash>`.
pub fn recipe_hash() -> String {
    let sources = fs::read(APT_SOURCES)
        .unwrap_or_else(|e| format!("unreadable {APT_SOURCES}: {e}").into_bytes());
    Recipe::standard().hash(&sources)
}

/// Builds (or takes from the cache) the MediaWiki image and pushes it to `registry` as
/// `mediawiki:1.39`; returns the reference to put in a manifest (`127.0.0.1:PORT/mediawiki:1.39`).
pub fn push_mediawiki(registry: &Registry) -> Result<String> {
    let layout = cached_layout()?;
    push_layout(registry, &layout, NAME, TAG, &PushOpts::default())?;
    Ok(format!("{}/{NAME}:{TAG}", registry.host()))
}

/// `$HOMEPORT_TEST_CACHE/images`, or `/var/cache/homeport-test/images`.
fn images_dir(cache_env: Option<OsString>) -> PathBuf {
    cache_env
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT))
        .join("images")
}

/// The cached OCI layout, built first if missing (once, under a lock).
fn cached_layout() -> Result<PathBuf> {
    let images = images_dir(std::env::var_os(CACHE_ENV));
    let hash = recipe_hash();
    let final_dir = images.join(format!("mediawiki-{hash}"));
    let ready = |dir: &Path| dir.join("index.json").is_file();
    if ready(&final_dir) {
        return Ok(final_dir);
    }
    fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let lock_path = images.join(format!("mediawiki-{hash}.lock"));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    // Held until the end of this function: another caller waits here for our build.
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if ready(&final_dir) {
        return Ok(final_dir);
    }
    remove_dead_builds(&images, &hash)?;
    let build = tempfile::Builder::new()
        .prefix(&format!(".mediawiki-{hash}.build-"))
        .tempdir_in(&images)?;
    let layout = build.path().join("oci");
    build_layout(build.path(), &layout)?;
    fs::rename(&layout, &final_dir)
        .with_context(|| format!("moving {} to {}", layout.display(), final_dir.display()))?;
    Ok(final_dir)
}

/// Removes temporary directories of builds that were killed (we hold the lock: no build of
/// this recipe is running). Refuses to descend into one with something mounted below it.
fn remove_dead_builds(images: &Path, hash: &str) -> Result<()> {
    let prefix = format!(".mediawiki-{hash}.build-");
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for entry in fs::read_dir(images)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        ensure!(
            !mounted_below(&mountinfo, &path),
            "{} has mounts below it (a killed build?): unmount them, then remove it",
            path.display()
        );
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Whether a mount point in `mountinfo` (`/proc/self/mountinfo`) is `dir` or below it.
fn mounted_below(mountinfo: &str, dir: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|point| {
            point
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .any(|point| Path::new(&point).starts_with(dir))
}

/// umoci writes blobs readable by their owner only: let anyone read the cache.
fn make_readable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            make_readable(&entry.path())?;
        } else if file_type.is_file() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// mmdebstrap into `work/rootfs.tar`, then an OCI layout at `layout` with that tarball as its
/// only layer and our config.
fn build_layout(work: &Path, layout: &Path) -> Result<()> {
    let recipe = Recipe::standard();
    let customize = work.join("customize.sh");
    fs::write(&customize, &recipe.customize)?;
    let tarball = work.join("rootfs.tar");
    let tmp = work.join("tmp");
    fs::create_dir(&tmp)?;
    run(Command::new("mmdebstrap")
        .args(recipe.mmdebstrap_args(&tarball, &customize))
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
        // mmdebstrap fills a directory before packing it: keep it on this disk, not in a
        // possibly small /tmp.
        .env("TMPDIR", &tmp))
    .context("mmdebstrap (install it: scripts/deps.sh)")?;
    ensure!(
        tarball.is_file(),
        "mmdebstrap wrote no {}",
        tarball.display()
    );

    let image = format!("{}:{TAG}", layout.display());
    let umoci = |args: &[&str]| -> Result<()> { run(Command::new("umoci").args(args)).map(drop) };
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &image,
        "--history.created_by",
        &format!("mmdebstrap --variant=essential {SUITE} (homeport-testkit mediawiki)"),
        &tarball.to_string_lossy(),
    ])?;
    fs::remove_file(&tarball)?;
    let mut config = vec!["config".to_owned(), "--image".into(), image.clone()];
    config.extend(Recipe::config_args());
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&config)?;
    umoci(&["gc", "--layout", &layout.to_string_lossy()])?;
    make_readable(layout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_is_stable_and_hex() {
        let recipe = Recipe::standard();
        let a = recipe.hash(b"Types: deb\n");
        assert_eq!(a, Recipe::standard().hash(b"Types: deb\n"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(recipe_hash(), recipe_hash());
    }

    #[test]
    fn recipe_hash_changes_with_each_input() {
        let standard = Recipe::standard();
        let base = standard.hash(b"sources");
        assert_ne!(base, standard.hash(b"other sources"));

        let mut more = standard.clone();
        more.packages.push("php-sqlite3".into());
        assert_ne!(base, more.hash(b"sources"));

        let mut fewer = standard.clone();
        fewer.packages.retain(|p| p != "php-intl");
        assert_ne!(base, fewer.hash(b"sources"));

        let mut bumped = standard.clone();
        bumped.version += 1;
        assert_ne!(base, bumped.hash(b"sources"));

        let mut script = standard.clone();
        script.customize.push_str("true\n");
        assert_ne!(base, script.hash(b"sources"));
    }

    #[test]
    fn mmdebstrap_args_name_the_machine_sources_and_no_host() {
        let args = Recipe::standard()
            .mmdebstrap_args(Path::new("/w/rootfs.tar"), Path::new("/w/customize.sh"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[args.len() - 3..],
            ["bookworm", "/w/rootfs.tar", APT_SOURCES]
        );
        assert!(args.contains(&r#"--customize-hook=sh /w/customize.sh "$1""#.to_owned()));
        assert!(args.iter().any(|a| a.starts_with("--include=mediawiki,")));
        assert!(!args.iter().any(|a| a.contains("debian.org")));
        assert!(!CUSTOMIZE_SH.contains("debian.org"));
    }

    #[test]
    fn customize_script_parses() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("customize.sh");
        fs::write(&script, CUSTOMIZE_SH)?;
        run(Command::new("sh").arg("-n").arg(&script))?;
        Ok(())
    }

    #[test]
    fn mounts_below_a_dir_are_found() {
        let mountinfo = "22 1 253:0 / / rw - ext4 /dev/vda rw\n\
                         90 22 0:5 / /var/cache/x/.b-1/rootfs/dev rw - devtmpfs udev rw\n\
                         91 22 0:6 / /srv/a\\040b rw - tmpfs tmpfs rw\n";
        assert!(mounted_below(mountinfo, Path::new("/var/cache/x/.b-1")));
        assert!(!mounted_below(mountinfo, Path::new("/var/cache/x/.b-2")));
        assert!(!mounted_below(mountinfo, Path::new("/var/cache/x/.b")));
        assert!(mounted_below(mountinfo, Path::new("/srv/a b")));
    }

    #[test]
    fn cache_dir_follows_the_environment() {
        assert_eq!(
            images_dir(None),
            Path::new("/var/cache/homeport-test/images")
        );
        assert_eq!(
            images_dir(Some(OsString::new())),
            Path::new("/var/cache/homeport-test/images")
        );
        assert_eq!(
            images_dir(Some("/srv/cache".into())),
            Path::new("/srv/cache/images")
        );
    }
}
