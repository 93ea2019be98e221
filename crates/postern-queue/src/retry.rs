//! When to try a deferred delivery again: exponential back-off bounded by the queue lifetime.

use std::time::Duration;

/// The retry schedule's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after the first failed attempt.
    pub initial: Duration,
    /// The largest delay between attempts.
    pub max: Duration,
    /// How long after arrival a message may stay queued before it is returned.
    pub lifetime: Duration,
}

impl Default for RetryPolicy {
    /// 5 minutes, growing to 1 hour, for up to 5 days (RFC 5321 4.5.4.1).
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(5 * 60),
            max: Duration::from_secs(60 * 60),
            lifetime: Duration::from_secs(5 * 24 * 60 * 60),
        }
    }
}

/// What to do after a temporary failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time (milliseconds since the epoch).
    RetryAt(u64),
    /// The message has been queued for its whole lifetime: return it to the sender.
    Expire,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RetryPolicy {
    /// The delay after `failures` failed attempts (1 for the first): `initial` doubled each
    /// time, at most `max`.
    pub fn delay(&self, failures: u32) -> u64 {
        let initial = millis(self.initial).max(1);
        let shift = failures.saturating_sub(1).min(40);
        initial
            .saturating_mul(1u64 << shift)
            .min(millis(self.max).max(initial))
    }

    /// After the `failures`-th failed attempt at `now` of a message that arrived at `arrival`:
    /// the next attempt, never later than the end of the lifetime (a last attempt is made
    /// then), or expiry once the lifetime is over.
    ///
    /// The delay is the doubling one, or the message's age when that is longer (at most
    /// `max`): on the doubling schedule the age is always the shorter, but the count of
    /// failures starts again in each run, and a message queued for a day is not tried every
    /// `initial` again after a restart, nor after a wait under `--hold` (the age-based
    /// back-off Postfix's queue manager uses).
    pub fn after_failure(&self, arrival: u64, failures: u32, now: u64) -> RetryDecision {
        self.after_failure_at(arrival, now.saturating_sub(arrival), failures, now)
    }

    /// [`RetryPolicy::after_failure`] for a message `age` ms old, as its owner counts it (on
    /// a clock that steps of the wall clock do not move); its lifetime still ends by the
    /// wall clock, from `arrival`.
    pub fn after_failure_at(
        &self,
        arrival: u64,
        age: u64,
        failures: u32,
        now: u64,
    ) -> RetryDecision {
        let deadline = arrival.saturating_add(millis(self.lifetime));
        if now >= deadline {
            return RetryDecision::Expire;
        }
        let age = age.min(millis(self.max));
        let delay = self.delay(failures).max(age);
        RetryDecision::RetryAt(now.saturating_add(delay).min(deadline))
    }

    /// Like [`RetryPolicy::after_failure`], for a job put off unsent because its next hop
    /// was paused for `pause` (ms) while it waited: past its lifetime it is not expired
    /// untried but goes again when the pause ends, as long as that is within two pauses of
    /// the lifetime's end (so pauses in a row cannot keep it queued).
    pub fn after_untried(
        &self,
        arrival: u64,
        failures: u32,
        now: u64,
        pause: u64,
    ) -> RetryDecision {
        self.after_untried_at(arrival, now.saturating_sub(arrival), failures, now, pause)
    }

    /// [`RetryPolicy::after_untried`] for a message `age` ms old (see
    /// [`RetryPolicy::after_failure_at`]).
    pub fn after_untried_at(
        &self,
        arrival: u64,
        age: u64,
        failures: u32,
        now: u64,
        pause: u64,
    ) -> RetryDecision {
        let pause = pause.max(1);
        match self.after_failure_at(arrival, age, failures, now) {
            RetryDecision::Expire
                if now < self.expiry(arrival).saturating_add(pause.saturating_mul(2)) =>
            {
                RetryDecision::RetryAt(now.saturating_add(pause))
            }
            decision => decision,
        }
    }

    /// When to try again, after a restart at `now`, a delivery that an earlier run deferred
    /// until `recorded`: then, but no later than this run's settings allow, one longest delay
    /// from now and the end of the lifetime (where an attempt expires it). An operator who
    /// shortens `--retry-max` or `--max-queue-lifetime` and restarts sees them apply to mail
    /// already queued.
    pub fn resume_at(&self, arrival: u64, recorded: u64, now: u64) -> u64 {
        recorded
            .min(now.saturating_add(millis(self.max)))
            .min(self.expiry(arrival))
    }

    /// The time the message expires.
    pub fn expiry(&self, arrival: u64) -> u64 {
        arrival.saturating_add(millis(self.lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::{RetryDecision, RetryPolicy};
    use std::time::Duration;

    #[test]
    fn the_delay_follows_the_age_given_not_the_wall_clock_s() {
        let p = policy();
        let arrival = 1_000_000_000;
        // Ten seconds old by the owner's count, though the wall clock says two hours (it was
        // stepped ahead): the doubling delay, not an hour.
        let now = arrival + 2 * 3_600_000;
        assert_eq!(
            p.after_failure_at(arrival, 10_000, 1, now),
            RetryDecision::RetryAt(now + 300_000)
        );
        // By the wall clock's age: the longest delay.
        assert_eq!(
            p.after_failure(arrival, 1, now),
            RetryDecision::RetryAt(now + 3_600_000)
        );
        // The lifetime still ends by the wall clock.
        let late = arrival + 5 * 86_400_000;
        assert_eq!(
            p.after_failure_at(arrival, 10_000, 1, late),
            RetryDecision::Expire
        );
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(300),
            max: Duration::from_secs(3600),
            lifetime: Duration::from_secs(5 * 86400),
        }
    }

    #[test]
    fn a_recorded_attempt_is_held_to_this_run_s_settings() {
        let p = policy();
        let arrival = 1_000_000;
        let now = arrival + 600_000;
        // Within the settings: kept.
        assert_eq!(p.resume_at(arrival, now + 60_000, now), now + 60_000);
        // An earlier run's longer delay: at most one longest delay from now.
        assert_eq!(p.resume_at(arrival, now + 86_400_000, now), now + 3_600_000);
        // Past this run's lifetime: at its end, where the attempt expires it.
        let short = RetryPolicy {
            lifetime: Duration::from_secs(900),
            ..p
        };
        assert_eq!(
            short.resume_at(arrival, now + 3_000_000, now),
            arrival + 900_000
        );
        assert_eq!(
            short.after_failure(arrival, 1, arrival + 900_000),
            RetryDecision::Expire
        );
    }

    #[test]
    fn delays_double_up_to_the_max() {
        let p = policy();
        let got: Vec<u64> = (1..=7).map(|f| p.delay(f) / 1000).collect();
        assert_eq!(got, [300, 600, 1200, 2400, 3600, 3600, 3600]);
        assert_eq!(p.delay(u32::MAX), 3_600_000);
    }

    #[test]
    fn the_count_of_failures_starting_again_does_not_shorten_an_old_message_s_delay() {
        let p = policy();
        let arrival = 1_000_000;
        // A message queued for 3 hours fails for the first time in this run: an hour, not
        // five minutes.
        assert_eq!(
            p.after_failure(arrival, 1, arrival + 3 * 3_600_000),
            RetryDecision::RetryAt(arrival + 4 * 3_600_000)
        );
        // 20 minutes old: 20 minutes.
        assert_eq!(
            p.after_failure(arrival, 1, arrival + 1_200_000),
            RetryDecision::RetryAt(arrival + 2_400_000)
        );
        // On the doubling schedule of one run, the age changes nothing.
        let mut now = arrival;
        for (failures, minutes) in (1..=6).zip([5, 10, 20, 40, 60, 60]) {
            let RetryDecision::RetryAt(at) = p.after_failure(arrival, failures, now) else {
                panic!("expired")
            };
            assert_eq!(at - now, minutes * 60_000, "failure {failures}");
            now = at;
        }
    }

    #[test]
    fn last_attempt_at_the_end_of_the_lifetime_then_expiry() {
        let p = policy();
        let arrival = 1_000_000;
        let end = arrival + 5 * 86_400_000;
        assert_eq!(
            p.after_failure(arrival, 1, arrival),
            RetryDecision::RetryAt(arrival + 300_000)
        );
        assert_eq!(
            p.after_failure(arrival, 50, end - 1000),
            RetryDecision::RetryAt(end)
        );
        assert_eq!(p.after_failure(arrival, 51, end), RetryDecision::Expire);
    }

    #[test]
    fn a_job_put_off_unsent_at_the_end_of_its_lifetime_goes_again_after_the_pause() {
        let p = policy();
        let arrival = 1_000_000;
        let end = p.expiry(arrival);
        let pause = 60_000;
        // Before the end, as for a failure.
        assert_eq!(
            p.after_untried(arrival, 3, end - 1000, pause),
            p.after_failure(arrival, 3, end - 1000)
        );
        // At the end (the last attempt, put off): after the pause, not expired.
        assert_eq!(p.after_failure(arrival, 51, end), RetryDecision::Expire);
        assert_eq!(
            p.after_untried(arrival, 51, end, pause),
            RetryDecision::RetryAt(end + pause)
        );
        // Put off again at the pause's end: once more.
        assert_eq!(
            p.after_untried(arrival, 52, end + pause, pause),
            RetryDecision::RetryAt(end + 2 * pause)
        );
        // Two pauses past the end: expired.
        assert_eq!(
            p.after_untried(arrival, 53, end + 2 * pause, pause),
            RetryDecision::Expire
        );
    }

    #[test]
    fn walking_the_schedule_expires_within_the_lifetime() {
        let p = policy();
        let arrival = 0;
        let mut now = arrival;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match p.after_failure(arrival, attempts, now) {
                RetryDecision::RetryAt(t) => {
                    assert!(t > now);
                    now = t;
                }
                RetryDecision::Expire => break,
            }
            assert!(attempts < 1000);
        }
        assert_eq!(now, p.expiry(arrival));
        // 5 + 10 + 20 + 40 minutes, then hourly for the rest of 5 days.
        assert!((120..=125).contains(&attempts), "{attempts}");
    }
}
