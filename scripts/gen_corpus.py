#!/usr/bin/env python3
"""Seeded generator of an OrbitingFox-like corpus in the pipeline's JSONL document format.

Several users; conversations, channel and group posts, Blink transcripts and analyses, notes;
emoji, URLs, mentions, several languages and scripts, HTML and markdown, junk whitespace and
control characters. With --facts it also plants the answer-bearing messages that
fixtures/questions.jsonl asks about. Same seed, same bytes.

    gen_corpus.py --seed 7 --users 6 --bytes 2000000 --facts --out fixtures/sample.jsonl
    gen_corpus.py --seed 1 --users 500 --bytes 1000000000 --out corpus.jsonl.gz
"""
import argparse, datetime, gzip, json, random, sys

WORDS = ("the a project meeting deadline launch budget review design team client server "
         "deploy release bug fix test plan idea coffee lunch weekend trip flight hotel "
         "report slides demo customer feedback roadmap sprint ticket merge branch invoice "
         "garden recipe movie concert birthday gift train station museum beach mountain "
         "tomorrow today later maybe definitely quickly carefully about with from into over "
         "need want think know send share call check update move finish start schedule").split()
SENT_OTHER = [
    "Bonjour à tous, la réunion est déplacée à jeudi après-midi.",
    "¿Alguien sabe dónde quedó el informe de ventas del trimestre?",
    "Guten Morgen! Der Zug nach München hat leider Verspätung.",
    "Привет! Давай созвонимся вечером и обсудим план.",
    "今日の会議は午後三時からです。資料を準備してください。",
    "我们明天上午十点在会议室见面，讨论新项目。",
    "مرحبا، هل يمكنك إرسال الملف قبل نهاية اليوم؟",
    "नमस्ते, कल की बैठक का समय बदल गया है।",
    "안녕하세요, 회의 자료를 공유해 주세요.",
    "Olá! Vamos almoçar juntos amanhã?",
    "Γεια σου! Τα λέμε αύριο στο γραφείο.",
    "שלום, הפגישה נדחתה לשבוע הבא.",
]
EMOJI = ["😀", "🎉", "👍🏽", "🚀", "❤️", "🔥", "😂", "🙏", "👨‍👩‍👧", "🇫🇷", "☕", "🤔"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
JUNK = ["\u200b", "\u0007", "\ufeff", "  ", "\t", "\r\n", "\u00a0", "\u0000"]

# Planted facts: (user_id, source_id, kind, text). Questions in fixtures/questions.jsonl point here.
FACTS = [
    (1, "fact-1-wifi", "message", "The wifi password for the Lisbon office is sardine-harbour-42, don't share it outside the team."),
    (1, "fact-1-dentist", "message", "Reminder: my dentist appointment moved to Tuesday the 14th at 9:30 with Dr. Okafor."),
    (1, "fact-1-budget", "channel_post", "Finance update: the Q3 marketing budget was cut from 80k to 55k euros, effective immediately."),
    (1, "fact-1-cat", "note", "Pickles the cat needs her thyroid pill twice a day, half a tablet mixed into wet food."),
    (1, "fact-1-flight", "message", "Booked it! Flight TP1352 to Porto departs at 07:15 from terminal 1 on Friday."),
    (1, "fact-1-blink", "blink_transcript", "Okay so the decision from today's call: we are migrating the billing service from MySQL to Postgres in November, and Carol owns the data migration scripts."),
    (1, "fact-1-gift", "group_post", "For Dave's farewell gift we agreed on a vintage film camera, everyone chips in 20 euros."),
    (1, "fact-1-recipe", "note", "Grandma's lemon cake: 200g flour, 150g sugar, three eggs, zest of two lemons, bake 40 minutes at 180 degrees."),
    (2, "fact-2-wifi", "message", "Our guest wifi at the Berlin studio is called kiez-gast, the password changes monthly."),
    (2, "fact-2-band", "message", "Band practice is now on Wednesdays at the rehearsal room near Ostkreuz, bring your own cables."),
    (2, "fact-2-car", "note", "The car's next inspection is due in March, the garage on Sonnenallee quoted 120 euros."),
    (2, "fact-2-blink", "blink_transcript", "Summary of the interview: the candidate has six years of Rust experience and can start in January."),
]

def sentence(r):
    n = r.randint(4, 16)
    s = " ".join(r.choice(WORDS) for _ in range(n))
    s = s[0].upper() + s[1:] + r.choice([".", "!", "?", "...", ""])
    if r.random() < 0.15:
        s = r.choice(SENT_OTHER)
    if r.random() < 0.2:
        s += " " + r.choice(EMOJI)
    if r.random() < 0.1:
        s += " @" + r.choice(NAMES)
    if r.random() < 0.06:
        s += " https://example.org/%s/%d" % (r.choice(WORDS), r.randint(1, 9999))
    if r.random() < 0.05:
        s = s.replace(" ", r.choice(JUNK), 1)
    return s

def paragraph(r, lo, hi):
    return " ".join(sentence(r) for _ in range(r.randint(lo, hi)))

def html_post(r):
    items = "".join("<li>%s</li>" % sentence(r) for _ in range(r.randint(1, 4)))
    return "<div><p>%s</p><ul>%s</ul><p>%s &amp; <b>%s</b></p></div>" % (
        paragraph(r, 1, 3), items, sentence(r), r.choice(WORDS))

def md_post(r):
    return "# %s\n\n%s **%s** [link](https://example.com/%d)\n\n- %s\n- %s" % (
        sentence(r), paragraph(r, 1, 3), r.choice(WORDS), r.randint(1, 99), sentence(r), sentence(r))

def doc(uid, kind, sid, text, ts, conv=None, author=None, title=None):
    d = {"user_id": uid, "kind": kind, "source_id": sid, "text": text,
         "created_at": ts.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if conv: d["conversation_id"] = conv
    if author: d["author"] = author
    if title: d["title"] = title
    return d

def generate(args, out):
    r = random.Random(args.seed)
    t0 = datetime.datetime(2026, 1, 5, 8, 0, 0)
    written, n = 0, 0
    facts = list(FACTS) if args.facts else []
    while written < args.bytes:
        uid = r.randint(1, args.users)
        ts = t0 + datetime.timedelta(seconds=n * 37 + r.randint(0, 30))
        roll = r.random()
        n += 1
        if roll < 0.70:  # a burst of chat in one conversation
            conv = "conv-%d-%d" % (uid, r.randint(1, 40))
            kind = r.choice(["message", "message", "message", "channel_post", "group_post"])
            for j in range(r.randint(1, 12)):
                text = sentence(r) if r.random() < 0.85 else paragraph(r, 2, 6)
                if r.random() < 0.03: text = " \n\t "  # empty after cleaning
                if r.random() < 0.02: text = "ok 👍"  # duplicates
                d = doc(uid, kind, "m-%d-%d" % (n, j), text, ts + datetime.timedelta(seconds=40 * j), conv, r.choice(NAMES))
                line = json.dumps(d, ensure_ascii=False) + "\n"
                out.write(line); written += len(line.encode())
            continue
        if roll < 0.80:
            d = doc(uid, r.choice(["channel_post", "group_post"]), "p-%d" % n,
                    html_post(r) if r.random() < 0.5 else md_post(r), ts, "chan-%d" % r.randint(1, 10), r.choice(NAMES))
        elif roll < 0.90:
            body = "\n\n".join(paragraph(r, 3, 9) for _ in range(r.randint(2, 12)))
            d = doc(uid, "blink_transcript", "bt-%d" % n, body, ts, title="Blink %d" % n)
        elif roll < 0.95:
            d = doc(uid, "blink_analysis", "ba-%d" % n, "Summary: %s\n\nAction items:\n- %s\n- %s\n\nSentiment: %s" % (
                paragraph(r, 2, 4), sentence(r), sentence(r), r.choice(["positive", "neutral", "mixed"])), ts)
        else:
            d = doc(uid, "note", "n-%d" % n, paragraph(r, 1, 10), ts, title=sentence(r)[:40])
        line = json.dumps(d, ensure_ascii=False) + "\n"
        out.write(line); written += len(line.encode())
        if facts and r.random() < 0.05:
            uid_f, sid, kind, text = facts.pop(0)
            conv = "conv-%d-facts-%s" % (uid_f, sid) if kind in ("message", "channel_post", "group_post") else None
            line = json.dumps(doc(uid_f, kind, sid, text, ts, conv, "alice"), ensure_ascii=False) + "\n"
            out.write(line); written += len(line.encode())
    for uid_f, sid, kind, text in facts:
        conv = "conv-%d-facts-%s" % (uid_f, sid) if kind in ("message", "channel_post", "group_post") else None
        out.write(json.dumps(doc(uid_f, kind, sid, text, t0, conv, "alice"), ensure_ascii=False) + "\n")

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--bytes", type=int, default=2_000_000)
    p.add_argument("--facts", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    opener = gzip.open if a.out.endswith(".gz") else open
    with opener(a.out, "wt", encoding="utf-8", newline="\n") as out:
        generate(a, out)

if __name__ == "__main__":
    main()
