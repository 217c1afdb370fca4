//! Names for the pool slots in use, as prefork numbers its children `ForkPoolWorker-1…N`: a
//! running task takes the lowest free number, and its log lines name it (`logging::CeleryFormat`).

use std::sync::Mutex;

/// Which numbers are taken, from 1; grows with `pool_grow`, never past the most ever running.
#[derive(Default)]
pub(crate) struct SlotNames(Mutex<Vec<bool>>);

/// A number held while a task runs; free again when dropped.
pub(crate) struct SlotName<'a> {
    n: usize,
    names: &'a SlotNames,
}

impl SlotNames {
    pub(crate) fn take(&self) -> SlotName<'_> {
        let mut used = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let i = match used.iter().position(|u| !u) {
            Some(i) => i,
            None => {
                used.push(false);
                used.len() - 1
            }
        };
        used[i] = true;
        SlotName {
            n: i + 1,
            names: self,
        }
    }
}

impl SlotName<'_> {
    pub(crate) fn number(&self) -> u64 {
        self.n as u64
    }
}

impl Drop for SlotName<'_> {
    fn drop(&mut self) {
        let mut used = self.names.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = used.get_mut(self.n - 1) {
            *u = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_takes_the_lowest_free_number() {
        let names = SlotNames::default();
        let a = names.take();
        let b = names.take();
        let c = names.take();
        assert_eq!((a.number(), b.number(), c.number()), (1, 2, 3));
        drop(b);
        assert_eq!(names.take().number(), 2);
        drop(a);
        let d = names.take();
        assert_eq!(d.number(), 1);
        assert_eq!(
            names.take().number(),
            2,
            "2 was freed when the last taker dropped it"
        );
        drop(c);
    }
}
