"""Person names for the waiting-line data: common English first and last names, listed by hand for this project."""

FIRST_NAMES = """
Aaron Abigail Adam Adrian Aiden Alan Albert Alex Alexander Alexis Alice Alicia Allison Amanda Amber Amy Andrea Andrew
Angela Anna Anne Anthony Antonio April Arthur Ashley Austin Barbara Benjamin Betty Beverly Billy Bobby Bonnie Bradley
Brandon Brenda Brian Brittany Bruce Bryan Caleb Cameron Carl Carlos Carol Caroline Carolyn Catherine Chad Charles
Charlotte Cheryl Chloe Christian Christina Christine Christopher Cindy Claire Clara Colin Connor Craig Crystal Cynthia
Daisy Dale Daniel Danielle David Dawn Dean Deborah Debra Dennis Derek Diana Diane Dominic Donald Donna Doris Dorothy
Douglas Dylan Edith Edward Eileen Elaine Eleanor Elijah Elizabeth Ella Ellen Emily Emma Eric Erica Erin Ethan Eugene
Evan Evelyn Felix Fiona Frances Francis Frank Gabriel Gail Gary George Gerald Gloria Grace Gregory Hannah Harold Harry
Heather Helen Henry Holly Howard Ian Irene Isaac Isabel Jack Jacob Jacqueline Jake James Jamie Janet Janice Jared Jason
Jean Jeffrey Jennifer Jeremy Jerry Jesse Jessica Joan Joanna Joe Joel John Johnny Jonathan Jordan Jose Joseph Joshua
Joyce Juan Judith Judy Julia Julie Justin Karen Katherine Kathleen Kathy Kayla Keith Kelly Kenneth Kevin Kimberly
Kyle Laura Lauren Lawrence Leah Leo Leonard Lily Linda Lisa Logan Lori Louis Lucas Lucy Luke Lydia Madison Marcus
Margaret Maria Marie Marilyn Mark Martha Martin Mary Mason Matthew Megan Melissa Michael Michelle Mildred Molly Monica
Nancy Natalie Nathan Nicholas Nicole Noah Nora Oliver Olivia Oscar Owen Pamela Patricia Patrick Paul Paula Peggy Peter
Philip Phyllis Rachel Ralph Randy Raymond Rebecca Regina Richard Rita Robert Robin Roger Ronald Rose Ruby Russell Ruth
Ryan Samantha Samuel Sandra Sara Sarah Scott Sean Sharon Shirley Simon Sophia Stanley Stephanie Stephen Steven Susan
Sylvia Tammy Teresa Terry Theresa Thomas Timothy Tina Todd Tony Tracy Travis Tyler Valerie Vanessa Victor Victoria
Vincent Virginia Walter Wanda Wayne Wendy William Willie Zachary Zoe
""".split()

LAST_NAMES = """
Adams Alexander Allen Alvarez Anderson Armstrong Arnold Austin Bailey Baker Banks Barnes Bell Bennett Berry Bishop
Black Boyd Bradley Brooks Brown Bryant Burke Burns Butler Campbell Carlson Carpenter Carroll Carter Castillo Chapman
Chavez Clark Cole Coleman Collins Cook Cooper Cox Crawford Cruz Cunningham Daniels Davidson Davis Dean Diaz Dixon
Douglas Duncan Dunn Edwards Elliott Ellis Evans Ferguson Fernandez Fisher Fleming Flores Ford Foster Fox Franklin
Freeman Garcia Gardner Gibson Gilbert Gomez Gonzales Gordon Graham Grant Gray Green Griffin Hall Hamilton Hansen Harper
Harris Harrison Hart Hawkins Hayes Henderson Henry Hernandez Hicks Hill Holland Holmes Howard Hudson Hughes Hunt Hunter
Jackson James Jenkins Jensen Johnson Johnston Jones Jordan Kelley Kelly Kennedy Kim King Knight Lane Larson Lawrence
Lawson Lee Lewis Long Lopez Lynch Marshall Martin Martinez Mason Matthews Mcdonald Medina Meyer Miller Mills Mitchell
Montgomery Moore Morales Moreno Morgan Morris Murphy Murray Myers Nelson Newman Nichols Nguyen Oliver Olson Ortiz Owens
Palmer Parker Patel Patterson Payne Perez Perkins Perry Peters Peterson Phillips Pierce Porter Powell Price Ramirez
Ramos Reed Reid Reyes Reynolds Rice Richards Richardson Riley Rivera Roberts Robertson Robinson Rodriguez Rogers Romero
Rose Ross Russell Ryan Sanchez Sanders Schmidt Scott Shaw Simmons Simpson Smith Snyder Spencer Stanley Stephens Stevens
Stewart Stone Sullivan Sutton Taylor Thomas Thompson Torres Tran Tucker Turner Wagner Walker Wallace Walsh Ward Warren
Washington Watkins Watson Weaver Webb Wells West Wheeler White Williams Willis Wilson Wood Woods Wright Young
""".split()
