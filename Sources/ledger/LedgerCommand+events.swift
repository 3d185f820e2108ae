import ArgumentParser
import Foundation
import LedgerClient
import LedgerCore

extension LedgerCommand {
    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "GET /v1/events: print the client's events as JSON lines, oldest first; --follow waits for new ones for ever.",
            discussion: """
                Exit 0 when the feed is printed to its end (never, with --follow), 1 on a definitive error answer \
                (an unknown --after, a bad token), 2 when the service gave no definitive answer within the retry \
                policy: run it again with --after set to the last id printed.
                """)

        @OptionGroup var connection: ConnectionOptions

        @Option(name: .customLong("after"), help: "Print the events after this id (default: from the first).")
        var after: String?

        @Flag(name: .customLong("follow"), help: "Keep waiting for new events (long-polls) instead of stopping at the end.")
        var follow = false

        @Option(name: .customLong("limit"), help: "Events per request, 1 to 1000.")
        var limit: Int = 1_000

        func validate() throws {
            guard (1...EventsQuery.limitMax).contains(limit) else { throw ValidationError("--limit must be 1 to 1000") }
        }

        func run() async throws {
            let client = try connection.client()
            // A long-poll must end well within one attempt's bound, or the wait would count as a timeout.
            let waitS = follow ? max(0, min(EventsQuery.waitSecondsMax, connection.attemptTimeoutS - 5)) : 0
            var cursor = after
            while true {
                let answer: LedgerAnswer
                do {
                    answer = try await client.answer { [cursor] in
                        try await $0.listEvents(query: .init(after: cursor, limit: limit, waitS: waitS))
                    }.answer
                } catch {
                    ClientOptions.standardError("ledger: \(error); run again with --after \(cursor ?? "(none)")")
                    throw ExitCode(2)
                }
                guard answer.isSuccess, let page = try? JSONParser.parse(answer.body),
                    case .array(let events)? = page["events"]
                else {
                    ClientOptions.standardError("ledger: \(answer.status) \(answer.problem?.code ?? "")")
                    FileHandle.standardError.write(Data(answer.body + [UInt8(ascii: "\n")]))
                    throw ExitCode(1)
                }
                if !events.isEmpty {
                    FileHandle.standardOutput.write(Data(events.map { $0.compactText + "\n" }.joined().utf8))
                }
                if case .string(let next)? = page["next_after"] { cursor = next }
                if events.isEmpty && !follow { return }
            }
        }
    }
}
