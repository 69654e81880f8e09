//! keygen → init → publish → load with tough as a device would, and the ways it must fail.
#![allow(clippy::unwrap_used)] // tests may unwrap what they just built

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use homeport_release::testing::fake_update;
use homeport_release::{Error, Expires, Expiry, InitOptions, RefreshOptions, Role, TARGET_FILES};
use tough::{ExpirationEnforcement, IntoVec, Repository, TargetName};

const BOARD: &str = "qemu-x86_64";

struct Setup {
    _dir: tempfile::TempDir,
    keys: PathBuf,
    repo: PathBuf,
    builds: PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let repo = dir.path().join("repo");
    homeport_release::keygen(&keys).unwrap();
    homeport_release::init(&keys, &repo, &InitOptions::default())
        .await
        .unwrap();
    Setup {
        keys,
        repo,
        builds: dir.path().join("builds"),
        _dir: dir,
    }
}

impl Setup {
    fn build(&self, version: &str, salt: &str) -> PathBuf {
        let content = |what: &str| format!("{what} of {version} {salt}\n").repeat(1000);
        fake_update(
            &self.builds.join(version),
            BOARD,
            version,
            content("root").as_bytes(),
            content("uki-a").as_bytes(),
            content("uki-b").as_bytes(),
        )
        .unwrap()
    }

    async fn publish(
        &self,
        update_json: &Path,
    ) -> homeport_release::Result<homeport_release::Published> {
        homeport_release::publish(&self.keys, &self.repo, update_json, &Expiry::default()).await
    }

    /// Loads the repository as a device that was made with the first root.
    async fn device_load(&self) -> homeport_release::Result<Repository> {
        let root = std::fs::read(self.repo.join("1.root.json")).unwrap();
        homeport_release::load(&self.repo, &root, ExpirationEnforcement::Safe).await
    }
}

/// Every file of the repository and its content.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.strip_prefix(dir).unwrap().to_owned(), Vec::new());
                todo.push(path);
            } else {
                let content = std::fs::read(&path).unwrap();
                out.insert(path.strip_prefix(dir).unwrap().to_owned(), content);
            }
        }
    }
    out
}

async fn read_target(repo: &Repository, name: &str) -> Vec<u8> {
    let name = TargetName::new(name).unwrap();
    repo.read_target(&name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no target {}", name.raw()))
        .into_vec()
        .await
        .unwrap()
}

/// The update.json's compressed artifact files, in the order of TARGET_FILES after update.json.
fn artifact_files(update_json: &Path) -> Vec<PathBuf> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(update_json).unwrap()).unwrap();
    ["root", "uki-a", "uki-b"]
        .iter()
        .map(|k| {
            let file = v["artifacts"][k]["file"].as_str().unwrap();
            update_json.parent().unwrap().join(file)
        })
        .collect()
}

fn versions(repo: &Repository) -> (u64, u64, u64, u64) {
    (
        repo.root().signed.version.get(),
        repo.targets().signed.version.get(),
        repo.snapshot().signed.version.get(),
        repo.timestamp().signed.version.get(),
    )
}

#[tokio::test]
async fn init_makes_a_repository_a_device_loads() {
    let s = setup().await;
    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 1, 1, 1));
    assert!(repo.root().signed.consistent_snapshot);
    assert_eq!(repo.all_targets().count(), 0);
    assert_eq!(
        std::fs::read(s.repo.join("root.json")).unwrap(),
        std::fs::read(s.repo.join("1.root.json")).unwrap()
    );
    assert!(s.repo.join("targets").is_dir());

    let err = homeport_release::init(&s.keys, &s.repo, &InitOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RepoExists { .. }), "{err}");
}

#[tokio::test]
async fn publish_then_read_every_target_back() {
    let s = setup().await;
    let v1 = s.build("0.1.0.1000", "a");
    let published = s.publish(&v1).await.unwrap();
    assert_eq!(
        (
            published.targets_version,
            published.snapshot_version,
            published.timestamp_version
        ),
        (2, 2, 2)
    );

    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 2, 2, 2));
    let mut sources = vec![v1.clone()];
    sources.extend(artifact_files(&v1));
    for ((file, source), p) in TARGET_FILES.iter().zip(&sources).zip(&published.targets) {
        let name = format!("{BOARD}/0.1.0.1000/{file}");
        assert_eq!(p.name, name);
        let expected = std::fs::read(source).unwrap();
        assert_eq!(read_target(&repo, &name).await, expected, "{name}");
        // tough's consistent-snapshot file name: targets/<sha256>.<name>
        assert_eq!(
            p.path,
            std::fs::canonicalize(&s.repo)
                .unwrap()
                .join(format!("targets/{}.{name}", p.sha256))
        );
        assert_eq!(std::fs::read(&p.path).unwrap(), expected);
    }
    assert_eq!(repo.all_targets().count(), 4);
    // The device decompresses what it fetched: the fake artifacts are real zstd.
    let root = read_target(&repo, &format!("{BOARD}/0.1.0.1000/root.erofs.zst")).await;
    let root = zstd::decode_all(root.as_slice()).unwrap();
    assert!(root.starts_with(b"root of 0.1.0.1000 a\n"));
    // No staging or temporary files are left behind.
    assert!(tree(&s.repo)
        .keys()
        .all(|p| !p.to_string_lossy().contains("/.") && !p.to_string_lossy().starts_with('.')));
}

#[tokio::test]
async fn a_second_release_keeps_the_first() {
    let s = setup().await;
    let v1 = s.build("0.1.0.1000", "a");
    let v2 = s.build("0.1.0.2000", "b");
    s.publish(&v1).await.unwrap();
    let p2 = s.publish(&v2).await.unwrap();
    assert_eq!(
        (
            p2.targets_version,
            p2.snapshot_version,
            p2.timestamp_version
        ),
        (3, 3, 3)
    );

    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 3, 3, 3));
    assert_eq!(repo.all_targets().count(), 8);
    for version in ["0.1.0.1000", "0.1.0.2000"] {
        let json = read_target(&repo, &format!("{BOARD}/{version}/update.json")).await;
        assert_eq!(
            json,
            std::fs::read(
                s.builds
                    .join(version)
                    .join(format!("homeport-{BOARD}-{version}.update.json"))
            )
            .unwrap()
        );
    }

    // The same release again changes nothing but versions; other content under its name is
    // refused.
    s.publish(&v2).await.unwrap();
    let before = tree(&s.repo);
    let other = s.build("0.1.0.2000", "c");
    let err = s.publish(&other).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyPublished { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("qemu-x86_64/0.1.0.2000/update.json"),
        "{err}"
    );
    assert_eq!(tree(&s.repo), before);
}

#[tokio::test]
async fn bad_input_leaves_the_repository_as_it_was() {
    let s = setup().await;
    s.publish(&s.build("0.1.0.1000", "a")).await.unwrap();
    let before = tree(&s.repo);
    let unchanged = |what: &str| assert!(tree(&s.repo) == before, "{what} changed the repository");

    // A wrong compressed_sha256.
    let v2 = s.build("0.1.0.2000", "b");
    let good = std::fs::read_to_string(&v2).unwrap();
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let sha = v["artifacts"]["uki-a"]["compressed_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&v2, good.replace(&sha, &"0".repeat(64))).unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(matches!(err, Error::ArtifactHash { .. }), "{err}");
    assert!(
        err.to_string().contains("uki-a.efi.zst has sha256"),
        "{err}"
    );
    unchanged("a wrong sha256");

    // An artifact whose content changed after the build (same length).
    std::fs::write(&v2, &good).unwrap();
    let uki_b = &artifact_files(&v2)[2];
    let mut bytes = std::fs::read(uki_b).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(uki_b, &bytes).unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(
        err.to_string().contains("uki-b.efi.zst has sha256"),
        "{err}"
    );
    unchanged("a changed artifact");

    // A truncated one.
    bytes.pop();
    std::fs::write(uki_b, &bytes).unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(matches!(err, Error::ArtifactSize { .. }), "{err}");
    unchanged("a truncated artifact");

    // A missing one.
    std::fs::remove_file(uki_b).unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(format!("{err}").contains("uki-b.efi.zst"), "{err}");
    unchanged("a missing artifact");

    // Malformed update.json, a bad board name, a missing update.json.
    std::fs::write(&v2, "{\"board\": ").unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(matches!(err, Error::ManifestParse { .. }), "{err}");
    std::fs::write(&v2, good.replace("\"qemu-x86_64\"", "\"../etc\"")).unwrap();
    let err = s.publish(&v2).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("board \"../etc\" is not a valid name"),
        "{err}"
    );
    let err = s
        .publish(&s.builds.join("nope.update.json"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope.update.json"), "{err}");
    unchanged("a bad update.json");

    // Missing or foreign keys.
    let v3 = s.build("0.1.0.3000", "c");
    let targets_key = Role::Targets.key_path(&s.keys);
    let saved = std::fs::read(&targets_key).unwrap();
    std::fs::remove_file(&targets_key).unwrap();
    let err = s.publish(&v3).await.unwrap_err();
    assert!(err.to_string().starts_with("no targets key at"), "{err}");
    let other = s.builds.join("other-keys");
    homeport_release::keygen(&other).unwrap();
    std::fs::copy(Role::Targets.key_path(&other), &targets_key).unwrap();
    let err = s.publish(&v3).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyNotInRoot {
                role: Role::Targets,
                ..
            }
        ),
        "{err}"
    );
    unchanged("a wrong key");
    std::fs::write(&targets_key, saved).unwrap();
    s.publish(&v3).await.unwrap();
}

#[tokio::test]
async fn refresh_renews_the_timestamp_and_the_snapshot_when_due() {
    let s = setup().await;
    // Published with an expired timestamp: a device refuses it.
    let past = Expires::At(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1));
    let expiry = Expiry {
        timestamp: past,
        ..Expiry::default()
    };
    let v1 = s.build("0.1.0.1000", "a");
    homeport_release::publish(&s.keys, &s.repo, &v1, &expiry)
        .await
        .unwrap();
    let err = s.device_load().await.unwrap_err();
    assert!(format!("{:?}", err).contains("ExpiredMetadata"), "{err:?}");

    // Only the timestamp key is needed while the snapshot is far from expiry.
    let server_keys = s.builds.join("server-keys");
    std::fs::create_dir_all(&server_keys).unwrap();
    std::fs::copy(
        Role::Timestamp.key_path(&s.keys),
        Role::Timestamp.key_path(&server_keys),
    )
    .unwrap();
    let r = homeport_release::refresh(&server_keys, &s.repo, &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(r.timestamp_version, 3);
    assert!(r.snapshot.is_none());
    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 2, 2, 3));

    // A snapshot that expires within two timestamp lifetimes is renewed, which needs its key.
    let soon = Expiry {
        snapshot: Expires::After(Duration::from_secs(3600)),
        ..Expiry::default()
    };
    let v2 = s.build("0.1.0.2000", "b");
    homeport_release::publish(&s.keys, &s.repo, &v2, &soon)
        .await
        .unwrap();
    let before = tree(&s.repo);
    let err = homeport_release::refresh(&server_keys, &s.repo, &RefreshOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SnapshotKeyNeeded { .. }), "{err}");
    assert!(tree(&s.repo) == before);
    let r = homeport_release::refresh(&s.keys, &s.repo, &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(r.timestamp_version, 5);
    assert_eq!(r.snapshot.map(|(v, _)| v), Some(4));
    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 3, 4, 5));
    assert!(
        repo.snapshot().signed.expires
            > jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 6)
    );
    assert_eq!(repo.all_targets().count(), 8);
}

#[tokio::test]
async fn a_device_with_the_old_root_follows_a_rotation() {
    let s = setup().await;
    let v1 = s.build("0.1.0.1000", "a");
    s.publish(&v1).await.unwrap();
    let new_keys = s.builds.join("new-keys");
    homeport_release::keygen(&new_keys).unwrap();

    // The old root key is required.
    let wrong = s.builds.join("wrong-keys");
    homeport_release::keygen(&wrong).unwrap();
    let err = homeport_release::rotate_root(&wrong, &new_keys, &s.repo, &InitOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyNotInRoot {
                role: Role::Root,
                ..
            }
        ),
        "{err}"
    );

    let r = homeport_release::rotate_root(&s.keys, &new_keys, &s.repo, &InitOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (
            r.root_version,
            r.targets_version,
            r.snapshot_version,
            r.timestamp_version
        ),
        (2, 3, 3, 3)
    );
    assert_eq!(
        std::fs::read(s.repo.join("root.json")).unwrap(),
        std::fs::read(s.repo.join("2.root.json")).unwrap()
    );

    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (2, 3, 3, 3));
    let name = format!("{BOARD}/0.1.0.1000/root.erofs.zst");
    assert_eq!(
        read_target(&repo, &name).await,
        std::fs::read(&artifact_files(&v1)[0]).unwrap()
    );

    // The old keys sign nothing any more; the new ones publish and refresh.
    let v2 = s.build("0.1.0.2000", "b");
    let err = s.publish(&v2).await.unwrap_err();
    assert!(matches!(err, Error::KeyNotInRoot { .. }), "{err}");
    homeport_release::publish(&new_keys, &s.repo, &v2, &Expiry::default())
        .await
        .unwrap();
    homeport_release::refresh(&new_keys, &s.repo, &RefreshOptions::default())
        .await
        .unwrap();
    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (2, 4, 4, 5));
    assert_eq!(repo.all_targets().count(), 8);

    // A second rotation: a device with root 1 walks 1 → 2 → 3.
    let newer = s.builds.join("newer-keys");
    homeport_release::keygen(&newer).unwrap();
    homeport_release::rotate_root(&new_keys, &newer, &s.repo, &InitOptions::default())
        .await
        .unwrap();
    let repo = s.device_load().await.unwrap();
    assert_eq!(repo.root().signed.version.get(), 3);
}

#[tokio::test]
async fn prune_keeps_the_newest_releases_of_each_board() {
    let s = setup().await;
    for version in ["0.1.0.999", "0.1.0.1000", "0.1.0.2000"] {
        s.publish(&s.build(version, "a")).await.unwrap();
    }
    let other = fake_update(&s.builds.join("pi"), "rpi4", "0.1.0.5", b"r", b"a", b"b").unwrap();
    s.publish(&other).await.unwrap();
    let dropped_files: Vec<PathBuf> = {
        let repo = s.device_load().await.unwrap();
        repo.all_targets()
            .filter(|(n, _)| n.raw().contains("/0.1.0.999/"))
            .map(|(n, t)| {
                s.repo.join("targets").join(format!(
                    "{}.{}",
                    hex::encode(&t.hashes.sha256),
                    n.raw()
                ))
            })
            .collect()
    };
    assert_eq!(dropped_files.len(), 4);
    assert!(dropped_files.iter().all(|p| p.is_file()));
    std::fs::create_dir(s.repo.join(".staging-crashed")).unwrap();

    let keep = std::num::NonZeroUsize::new(2).unwrap();
    let p = homeport_release::prune(&s.keys, &s.repo, keep, &Expiry::default())
        .await
        .unwrap();
    assert_eq!(p.releases, [(BOARD.to_owned(), "0.1.0.999".to_owned())]);
    assert_eq!(p.versions, Some((6, 6, 6)));
    let repo = s.device_load().await.unwrap();
    assert_eq!(versions(&repo), (1, 6, 6, 6));
    assert_eq!(repo.all_targets().count(), 12);
    assert!(repo
        .all_targets()
        .all(|(n, _)| !n.raw().contains("/0.1.0.999/")));
    for version in ["0.1.0.1000", "0.1.0.2000"] {
        read_target(&repo, &format!("{BOARD}/{version}/root.erofs.zst")).await;
    }
    read_target(&repo, "rpi4/0.1.0.5/uki-b.efi.zst").await;
    assert!(dropped_files.iter().all(|p| !p.exists()));
    assert!(!s.repo.join(".staging-crashed").exists());
    let mut top: Vec<String> = std::fs::read_dir(&s.repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        [
            "1.root.json",
            "5.snapshot.json",
            "5.targets.json",
            "6.snapshot.json",
            "6.targets.json",
            "root.json",
            "targets",
            "timestamp.json"
        ]
    );

    // Nothing more to drop: nothing signed, nothing deleted.
    let p = homeport_release::prune(&s.keys, &s.repo, keep, &Expiry::default())
        .await
        .unwrap();
    assert!(
        p.releases.is_empty() && p.versions.is_none() && p.files.is_empty(),
        "{p:?}"
    );
}
