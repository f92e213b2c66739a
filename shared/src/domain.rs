//! The job domain: statuses and the moves between them (DESIGN.md §3), and the
//! small value types the API and the workers agree on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a job is in its life. Terminal states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum JobStatus {
    Queued,
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

/// A move the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Stopped,
    ];
    /// States a user can still stop, and that count against the active limit.
    pub const ACTIVE: [JobStatus; 3] = [JobStatus::Queued, JobStatus::Pending, JobStatus::Running];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "QUEUED",
            JobStatus::Pending => "PENDING",
            JobStatus::Running => "RUNNING",
            JobStatus::Succeeded => "SUCCEEDED",
            JobStatus::Failed => "FAILED",
            JobStatus::Stopped => "STOPPED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Stopped
        )
    }

    /// Checks a move. A fast job may finish between two looks, so PENDING can
    /// go straight to a terminal state; nothing leaves a terminal state.
    pub fn transition(self, to: JobStatus) -> Result<JobStatus, IllegalTransition> {
        use JobStatus::*;
        let allowed = match self {
            Queued => matches!(to, Pending | Stopped | Failed),
            Pending => matches!(to, Running | Succeeded | Failed | Stopped),
            Running => matches!(to, Succeeded | Failed | Stopped),
            Succeeded | Failed | Stopped => false,
        };
        if allowed {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a job status")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Progress a running function reports about itself (`PATCH sub_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubStatus {
    Mapping,
    OptimizingHardware,
    WaitingQpu,
    ExecutingQpu,
    PostProcessing,
}

impl SubStatus {
    const ALL: [SubStatus; 5] = [
        SubStatus::Mapping,
        SubStatus::OptimizingHardware,
        SubStatus::WaitingQpu,
        SubStatus::ExecutingQpu,
        SubStatus::PostProcessing,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SubStatus::Mapping => "MAPPING",
            SubStatus::OptimizingHardware => "OPTIMIZING_HARDWARE",
            SubStatus::WaitingQpu => "WAITING_QPU",
            SubStatus::ExecutingQpu => "EXECUTING_QPU",
            SubStatus::PostProcessing => "POST_PROCESSING",
        }
    }
    pub fn parse(s: &str) -> Option<SubStatus> {
        SubStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Who wrote a job event, in the original's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOrigin {
    Api,
    Scheduler,
}

impl EventOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOrigin::Api => "API",
            EventOrigin::Scheduler => "SCHEDULER",
        }
    }
}

/// Why an event was written, in the original's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventContext {
    RunProgram,
    ScheduleJobs,
    StopJob,
    UpdateJobStatus,
    SetSubStatus,
    SendError,
}

impl EventContext {
    pub fn as_str(self) -> &'static str {
        match self {
            EventContext::RunProgram => "RUN_PROGRAM",
            EventContext::ScheduleJobs => "SCHEDULE_JOBS",
            EventContext::StopJob => "STOP_JOB",
            EventContext::UpdateJobStatus => "UPDATE_JOB_STATUS",
            EventContext::SetSubStatus => "SET_SUB_STATUS",
            EventContext::SendError => "SEND_ERROR",
        }
    }
}

/// User names become path segments (data dirs) and Redis keys, so they are
/// kept to a safe alphabet.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 150
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Function titles as the original sanitises them: `[A-Za-z0-9_-/]`.
pub fn sanitize_title(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    #[test]
    fn allowed_moves() {
        let allowed = [
            (Queued, Pending),
            (Queued, Stopped),
            (Queued, Failed),
            (Pending, Running),
            (Pending, Succeeded),
            (Pending, Failed),
            (Pending, Stopped),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Stopped),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let ok = allowed.contains(&(from, to));
                assert_eq!(from.transition(to).is_ok(), ok, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn terminal_states_never_move() {
        for from in [Succeeded, Failed, Stopped] {
            assert!(from.is_terminal());
            for to in JobStatus::ALL {
                assert_eq!(from.transition(to), Err(IllegalTransition { from, to }));
            }
        }
        assert!(!Queued.is_terminal() && !Pending.is_terminal() && !Running.is_terminal());
    }

    #[test]
    fn status_strings_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
        assert!("DONE".parse::<JobStatus>().is_err());
        assert_eq!(serde_json::to_string(&Queued).unwrap(), "\"QUEUED\"");
    }

    #[test]
    fn sub_status_values() {
        assert_eq!(SubStatus::parse("WAITING_QPU"), Some(SubStatus::WaitingQpu));
        assert_eq!(SubStatus::parse("waiting_qpu"), None);
        assert_eq!(
            SubStatus::parse("OPTIMIZING_HARDWARE").unwrap().as_str(),
            "OPTIMIZING_HARDWARE"
        );
    }

    #[test]
    fn usernames_and_titles() {
        assert!(valid_username("alice@example.com"));
        assert!(!valid_username("../etc"));
        assert!(!valid_username(".."));
        assert!(!valid_username("a b"));
        assert_eq!(sanitize_title("my fn!/x_1-2"), "myfn/x_1-2");
    }
}
