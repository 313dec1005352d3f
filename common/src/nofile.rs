//! The open-files limit: raised at start to what the connection caps can
//! use, with a warning that names the number to set when even the hard
//! limit is below it.

/// Raises the soft open-files limit towards `need` (at most the hard limit);
/// `caps` names the settings that decide `need`, for the warning.
pub fn raise_open_files(need: u64, caps: &str) {
    match rlimit::increase_nofile_limit(need) {
        Ok(got) if got < need => tracing::warn!(
            limit = got, need,
            "open-files limit is below what {caps} can use; raise it to {need} (ulimit -n {need}, or LimitNOFILE={need} in the systemd unit) or lower {caps}"
        ),
        Ok(got) => tracing::debug!(limit = got, need, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, need, "cannot read the open-files limit"),
    }
}
