//! The embedded gateway's runner: `python <entrypoint>` in the unpacked
//! working dir, with the same environment contract as a Ray job.
//!
//! Each job has a directory under `<data>/jobs/<id>/` holding the working
//! dir, `output.log`, and two files a small `sh` wrapper writes itself:
//! `pid` (before the function starts) and `exit_code` (after it ends). The
//! wrapper is the leader of its own process group and outlives a crash of
//! the gateway, so after a restart the gateway re-adopts a live job (the pid
//! is checked against the job id in its command line, never trusted blindly)
//! or reads how it ended. A job never starts twice: a second start finds the
//! `pid` file, or the `spawning` marker of a start in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::artifact::{self, ArtifactLimits};
use crate::ray::{RayJobInfo, RayJobStatus, SubmitOutcome};

/// The `ray_host` value of jobs run by this runner.
pub const LOCAL_HOST: &str = "local";

/// Variables of the gateway's own environment a function may see; anything
/// else (database URLs, secret keys) is withheld.
const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "USER",
];

/// Grace between SIGTERM and SIGKILL on stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LocalRunError {
    #[error("local runner I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the artifact cannot be used: {0}")]
    Artifact(#[from] artifact::ArtifactError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalRunError + '_ {
    move |source| LocalRunError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct LocalRunner {
    root: PathBuf,
    python: String,
}

impl LocalRunner {
    pub fn new(data_dir: &Path, python: &str) -> Self {
        LocalRunner {
            root: data_dir.join("jobs"),
            python: python.to_string(),
        }
    }

    pub fn job_dir(&self, id: Uuid) -> PathBuf {
        self.root.join(id.to_string())
    }

    pub fn log_file(&self, id: Uuid) -> PathBuf {
        self.job_dir(id).join("output.log")
    }

    /// Unpacks the working dir once; a repeated call (a redelivered job) keeps it.
    pub async fn prepare(
        &self,
        id: Uuid,
        tar: Vec<u8>,
        limits: ArtifactLimits,
    ) -> Result<(), LocalRunError> {
        let dir = self.job_dir(id);
        let work = dir.join("work");
        let ready = dir.join("prepared");
        if ready.exists() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || -> Result<(), LocalRunError> {
            if work.exists() {
                std::fs::remove_dir_all(&work).map_err(io(&work))?;
            }
            std::fs::create_dir_all(&work).map_err(io(&work))?;
            artifact::extract_tar(&tar, &work, &limits)?;
            std::fs::write(&ready, b"").map_err(io(&ready))?;
            Ok(())
        })
        .await
        .map_err(|e| LocalRunError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other(e),
        })?
    }

    /// Starts the function unless it was started already.
    pub async fn start(
        &self,
        id: Uuid,
        entrypoint: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<SubmitOutcome, LocalRunError> {
        let dir = self.job_dir(id);
        let pid_file = dir.join("pid");
        let spawning = dir.join("spawning");
        if pid_file.exists() {
            return Ok(SubmitOutcome::AlreadyExists);
        }
        if spawning.exists() {
            // A start was in flight when a previous holder died: the wrapper
            // writes its pid within milliseconds if it did start.
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if pid_file.exists() {
                    return Ok(SubmitOutcome::AlreadyExists);
                }
            }
        }
        std::fs::write(&spawning, b"").map_err(io(&spawning))?;
        let log_path = self.log_file(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let log_err = log.try_clone().map_err(io(&log_path))?;
        // $0 names the job so a pid found later can be matched to it.
        let script = r#"echo "$$" > ../pid.tmp && mv ../pid.tmp ../pid && "$@"; echo "$?" > ../exit.tmp && mv ../exit.tmp ../exit_code"#;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(format!("qsgw-job-{id}"))
            .arg(&self.python)
            .arg(entrypoint)
            .current_dir(dir.join("work"))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        for name in INHERITED {
            if let Ok(v) = std::env::var(name) {
                cmd.env(name, v);
            }
        }
        cmd.env("PYTHONUNBUFFERED", "1").envs(env);
        let mut child = cmd.spawn().map_err(io(Path::new(&self.python)))?;
        // Reap the wrapper when it ends; its exit code file says how it went.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(SubmitOutcome::Submitted)
    }

    /// The job as Ray would describe it; `None` when it was never started.
    pub async fn job(&self, id: Uuid) -> Result<Option<RayJobInfo>, LocalRunError> {
        let dir = self.job_dir(id);
        let spawning = dir.join("spawning");
        let started = modified_ms(&spawning);
        let info =
            |status, message: Option<String>, end: Option<i64>, code: Option<i32>| RayJobInfo {
                status,
                message,
                start_time_ms: started,
                end_time_ms: end,
                driver_exit_code: code,
            };
        let exit_file = dir.join("exit_code");
        if let Some(code) = read_exit_code(&exit_file) {
            let (status, message) = if code == 0 {
                (RayJobStatus::Succeeded, None)
            } else {
                (
                    RayJobStatus::Failed,
                    Some(format!("The function exited with code {code}.")),
                )
            };
            return Ok(Some(info(
                status,
                message,
                modified_ms(&exit_file),
                Some(code),
            )));
        }
        match read_pid(&dir.join("pid")) {
            Some(pid) if wrapper_alive(pid, id) => {
                Ok(Some(info(RayJobStatus::Running, None, None, None)))
            }
            Some(_) => {
                // It may have just written its exit code.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(code) = read_exit_code(&exit_file) {
                    let status = if code == 0 {
                        RayJobStatus::Succeeded
                    } else {
                        RayJobStatus::Failed
                    };
                    return Ok(Some(info(
                        status,
                        None,
                        modified_ms(&exit_file),
                        Some(code),
                    )));
                }
                let message =
                    "The function's process ended without an exit status (it was killed)."
                        .to_string();
                Ok(Some(info(
                    RayJobStatus::Failed,
                    Some(message),
                    Some(now_ms()),
                    None,
                )))
            }
            None if spawning.exists() => {
                let age = started.map(|s| now_ms() - s).unwrap_or(0);
                if age > 10_000 {
                    let message = "The function's process never started.".to_string();
                    Ok(Some(info(
                        RayJobStatus::Failed,
                        Some(message),
                        Some(now_ms()),
                        None,
                    )))
                } else {
                    Ok(Some(info(RayJobStatus::Pending, None, None, None)))
                }
            }
            None => Ok(None),
        }
    }

    pub async fn logs_tail(&self, id: Uuid, max_bytes: usize) -> Result<String, LocalRunError> {
        let path = self.log_file(id);
        match crate::logs::tail_file(&path, max_bytes) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(LocalRunError::Io {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }

    /// Ends the whole process group: SIGTERM, then SIGKILL after a grace.
    pub async fn stop(&self, id: Uuid) -> Result<bool, LocalRunError> {
        let Some(pid) = read_pid(&self.job_dir(id).join("pid")) else {
            return Ok(false);
        };
        if !wrapper_alive(pid, id) {
            return Ok(false);
        }
        signal_group(pid, libc::SIGTERM);
        tokio::spawn(async move {
            tokio::time::sleep(STOP_GRACE).await;
            if wrapper_alive(pid, id) || group_alive(pid) {
                signal_group(pid, libc::SIGKILL);
            }
        });
        Ok(true)
    }

    /// Removes a finished job's directory (working dir and log).
    pub async fn cleanup(&self, id: Uuid) {
        let _ = tokio::fs::remove_dir_all(self.job_dir(id)).await;
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_exit_code(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn modified_ms(path: &Path) -> Option<i64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The pid is alive and is this job's wrapper (not a reused pid).
fn wrapper_alive(pid: i32, id: Uuid) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = format!("qsgw-job-{id}");
    let alive = cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == marker.as_bytes());
    alive && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn group_alive(pgid: i32) -> bool {
    // Signal 0 checks for existence without sending anything.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // The wrapper leads its own group (process_group(0)), so this reaches
        // the function and anything it started, and nothing else.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, body.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    async fn wait_end(r: &LocalRunner, id: Uuid) -> RayJobInfo {
        for _ in 0..200 {
            let info = r.job(id).await.unwrap().unwrap();
            if !matches!(info.status, RayJobStatus::Pending | RayJobStatus::Running) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job did not end");
    }

    #[tokio::test]
    async fn runs_once_reports_exit_codes_and_keeps_logs() {
        let data = tempfile::tempdir().unwrap();
        let r = LocalRunner::new(data.path(), "python3");
        let id = Uuid::new_v4();
        assert!(r.job(id).await.unwrap().is_none());
        let script = "import os\nprint('hi', os.environ['MY'])\nprint('secret?', os.environ.get('GATEWAY_SECRET_KEY'))\n";
        r.prepare(id, tar(&[("main.py", script)]), ArtifactLimits::default())
            .await
            .unwrap();
        let env = BTreeMap::from([("MY".to_string(), "value".to_string())]);
        assert!(matches!(
            r.start(id, "main.py", &env).await.unwrap(),
            SubmitOutcome::Submitted
        ));
        assert!(matches!(
            r.start(id, "main.py", &env).await.unwrap(),
            SubmitOutcome::AlreadyExists
        ));
        let info = wait_end(&r, id).await;
        assert_eq!(info.status, RayJobStatus::Succeeded);
        let logs = r.logs_tail(id, 1 << 20).await.unwrap();
        assert!(logs.contains("hi value"), "{logs}");
        assert!(
            logs.contains("secret? None"),
            "gateway variables are withheld: {logs}"
        );

        let failing = Uuid::new_v4();
        r.prepare(
            failing,
            tar(&[("main.py", "raise SystemExit(3)")]),
            ArtifactLimits::default(),
        )
        .await
        .unwrap();
        r.start(failing, "main.py", &BTreeMap::new()).await.unwrap();
        let info = wait_end(&r, failing).await;
        assert_eq!(
            (info.status, info.driver_exit_code),
            (RayJobStatus::Failed, Some(3))
        );
    }

    #[tokio::test]
    async fn stop_kills_the_whole_process_group() {
        let data = tempfile::tempdir().unwrap();
        let r = LocalRunner::new(data.path(), "python3");
        let id = Uuid::new_v4();
        // The function starts a grandchild; both must end.
        let script = "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\nprint('started', flush=True)\ntime.sleep(300)\n";
        r.prepare(id, tar(&[("main.py", script)]), ArtifactLimits::default())
            .await
            .unwrap();
        r.start(id, "main.py", &BTreeMap::new()).await.unwrap();
        for _ in 0..100 {
            if r.logs_tail(id, 1000).await.unwrap().contains("started") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = read_pid(&r.job_dir(id).join("pid")).unwrap();
        assert!(r.stop(id).await.unwrap());
        let info = wait_end(&r, id).await;
        assert_eq!(info.status, RayJobStatus::Failed);
        for _ in 0..100 {
            if !group_alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the process group outlived the stop");
    }
}
